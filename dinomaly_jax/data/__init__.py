"""Data: dataset layouts -> records, checks, transforms, grain pipelines, packed datasets, demo data.

May import: errors. (The command-line tools pack.py and visa_prepare.py also read config/.)
"""
