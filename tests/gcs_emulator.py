"""Starts gcp-storage-emulator (in memory) for tests: python -m tests.gcs_emulator PORT BUCKET.

One fidelity fix: GCS answers every media download with the object's generation in an
`x-goog-generation` header; the emulator leaves it out, and tensorstore (orbax's array
storage) refuses a read without it ("Malformed StorageGeneration"). The wrapper adds it.
"""
import sys
import time

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  if response.status.value in (200, 206):
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])


def main(port: int, bucket: str) -> None:
  objects.download = download_with_generation  # objects.get calls it for ?alt=media
  for _, methods in server.HANDLERS:
    for method, handler in methods.items():
      if handler is _download:
        methods[method] = download_with_generation
  with server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket):
    while True:
      time.sleep(1)


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
