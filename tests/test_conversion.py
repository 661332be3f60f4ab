"""Checkpoint conversion: formats, bad inputs, `--download`, ViTill delegation."""
import functools
import http.server
import re
import shutil
import threading
import types

from dinov2.models import vision_transformer as dinov2_vit
import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from dinomaly_jax.errors import CheckpointError
from dinomaly_jax.models import vit
from dinomaly_jax.weights import convert as weights_convert
from dinomaly_jax.weights import converted
from dinomaly_jax.weights import dinov2_keys
from dinomaly_jax.weights.torch_files import load_state_dict
from weight_conversion import convert
from weight_conversion import download


def tiny_official_state_dict(seed=0, **kwargs):
  """A 2-block, 64-wide official DINOv2 state dict with random values."""
  torch.manual_seed(seed)
  model = dinov2_vit.DinoVisionTransformer(patch_size=14, img_size=518, embed_dim=64, depth=2,
                                           num_heads=1, init_values=1.0, block_chunks=0, **kwargs)
  return {k: torch.randn(v.shape) for k, v in model.state_dict().items()}


def flat(tree, prefix=""):
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}/{key}").items()}
  return {prefix: np.asarray(tree)}


def assert_same_params(a, b):
  a, b = flat(a), flat(b)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def assert_cli_lists_problems(state, tmp_path, capsys, expected_problems):
  """Saves `state` as a .pth; the CLI must fail naming the file and exactly these problems."""
  path = tmp_path / "broken.pth"
  torch.save(state, path)
  assert convert.main(["--checkpoint", str(path), "--out", str(tmp_path / "out")]) == 1
  message = capsys.readouterr().err
  assert str(path) in message and f"{len(expected_problems)} problem(s)" in message
  for expected in expected_problems:
    assert expected in message
  assert not (tmp_path / "out").exists()


def test_bad_keys_are_all_listed_with_shapes(tmp_path, capsys):
  state = tiny_official_state_dict()
  del state["blocks.1.ls2.gamma"]
  del state["blocks.0.attn.proj.bias"]
  state["blocks.0.mlp.fc1.weight"] = torch.zeros(200, 64)
  state["pos_embed"] = torch.zeros(1, 1 + 37 * 37, 48)
  state["blocks.0.attn.extra.weight"] = torch.zeros(3, 3)
  assert_cli_lists_problems(state, tmp_path, capsys, (
      "missing blocks.1.ls2.gamma: expected shape (64,)",
      "missing blocks.0.attn.proj.bias: expected shape (64,)",
      "shape mismatch blocks.0.mlp.fc1.weight: expected (256, 64), found (200, 64)",
      "shape mismatch pos_embed: expected (1, 1370, 64), found (1, 1370, 48)",
      "unexpected blocks.0.attn.extra.weight: shape (3, 3)"))


def test_hf_bad_keys_use_file_names():
  model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
      hidden_size=64, num_hidden_layers=2, num_attention_heads=1, num_register_tokens=4,
      patch_size=14, image_size=518))
  state = dict(model.state_dict())
  del state["encoder.layer.1.attention.k_proj.weight"]
  state["encoder.layer.0.mlp.fc2.weight"] = torch.zeros(64, 100)
  with pytest.raises(CheckpointError) as error:
    dinov2_keys.convert_dinov2_state_dict(state)
  message = str(error.value)
  assert ("incomplete blocks.1.attn.qkv.weight: it fuses 3 tensors, found only "
          "['encoder.layer.1.attention.q_proj.weight', 'encoder.layer.1.attention.v_proj.weight']") in message
  assert "missing blocks.1.attn.qkv.weight: expected shape (192, 64)" in message
  assert ("shape mismatch encoder.layer.0.mlp.fc2.weight (-> blocks.0.mlp.fc2.weight): "
          "expected (64, 256), found (64, 100)") in message


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_unreadable_files_name_the_file(tmp_path, content):
  good = tmp_path / "good.pth"
  torch.save(tiny_official_state_dict(), good)
  path = tmp_path / "bad.pth"
  path.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2] if content is None else content)
  with pytest.raises(CheckpointError, match=re.escape(str(path))):
    load_state_dict(path)


def test_truncated_safetensors_and_missing_file(tmp_path):
  path = tmp_path / "model.safetensors"
  safetensors.torch.save_file(tiny_official_state_dict(), path)
  path.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(CheckpointError, match=re.escape(str(path))):
    load_state_dict(path)
  with pytest.raises(CheckpointError, match="does not exist"):
    load_state_dict(tmp_path / "nowhere.pth")


def test_arbitrary_pickles_are_refused(tmp_path):
  path = tmp_path / "pickle.pth"
  torch.save({"cls_token": torch.zeros(1), "hook": types.SimpleNamespace(a=1)}, path)
  with pytest.raises(CheckpointError, match="Cannot read checkpoint"):
    load_state_dict(path)


def test_hf_hub_names_equal_transformers5_names(tmp_path):
  """Hub files use `attention.attention.query` / `mlp.weights_in`; transformers 5 renames them."""
  config = transformers.Dinov2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     patch_size=14, image_size=518, use_swiglu_ffn=True)
  state = transformers.Dinov2Model(config).state_dict()
  hub = {}
  for key, value in state.items():  # the inverse of transformers' conversion_mapping for Dinov2
    for new, old in ((".attention.q_proj.", ".attention.attention.query."),
                     (".attention.k_proj.", ".attention.attention.key."),
                     (".attention.v_proj.", ".attention.attention.value."),
                     (".attention.o_proj.", ".attention.output.dense."),
                     (".mlp.down_proj.", ".mlp.weights_out.")):
      key = key.replace(new, old)
    hub[key] = value
  for suffix in ("weight", "bias"):
    for i in range(2):
      gate = hub.pop(f"encoder.layer.{i}.mlp.gate_proj.{suffix}")
      up = hub.pop(f"encoder.layer.{i}.mlp.up_proj.{suffix}")
      hub[f"encoder.layer.{i}.mlp.weights_in.{suffix}"] = torch.cat([gate, up])
  torch.save(hub, tmp_path / "pytorch_model.bin")
  safetensors.torch.save_file(state, tmp_path / "model.safetensors")
  from_bin, meta = weights_convert.convert_file(tmp_path / "pytorch_model.bin")
  from_safetensors, _ = weights_convert.convert_file(tmp_path / "model.safetensors")
  assert meta["source_format"] == "hf" and meta["ffn"] == "swiglu"
  assert_same_params(from_bin, from_safetensors)


def test_chunked_equals_plain_and_load_encoder_reads_files(tmp_path):
  plain = tiny_official_state_dict()
  chunked = {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{m.group(1)}.{m.group(1)}.", k): v
             for k, v in plain.items()}
  torch.save(plain, tmp_path / "plain.pth")
  torch.save(chunked, tmp_path / "chunked.pth")
  params, meta = converted.load_encoder(tmp_path / "plain.pth")
  assert (meta["vit"], meta["depth"], meta["num_heads"], meta["pos_grid"]) == ("custom", 2, 1, 37)
  assert_same_params(params, converted.load_encoder(tmp_path / "chunked.pth")[0])
  with pytest.raises(ValueError, match="registers=0.*registers=4"):
    converted.load_encoder(tmp_path / "plain.pth", registers=4)


def test_saved_tree_is_the_init_tree(tmp_path):
  hf = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
      hidden_size=64, num_hidden_layers=2, num_attention_heads=1, num_register_tokens=4,
      patch_size=14, image_size=518))
  torch.save(hf.state_dict(), tmp_path / "hf.bin")
  assert convert.main(["--checkpoint", str(tmp_path / "hf.bin"), "--out", str(tmp_path / "out")]) == 0
  params, meta = converted.load_encoder(tmp_path / "out")
  assert meta["source_file"] == str(tmp_path / "hf.bin")
  model = vit.DinoV2Encoder(embed_dim=64, depth=2, num_heads=1, num_registers=4)
  init = model.init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 3), np.float32), [0])["params"]
  assert jax.tree_util.tree_map(np.shape, params) == jax.tree_util.tree_map(np.shape, init)


def test_vitill_state_dict_is_delegated(tmp_path, monkeypatch):
  encoder = {f"encoder.{k}": v for k, v in tiny_official_state_dict().items()}
  state = dict(encoder, **{"bottleneck.0.fc1.weight": torch.zeros(4, 64),
                           "decoder.0.norm1.weight": torch.zeros(64)})
  calls = []
  fake = types.ModuleType("dinomaly_jax.weights.vitill_keys")
  fake.convert_vitill = lambda sd: calls.append(sd) or {
      "encoder": dinov2_keys.convert_dinov2_state_dict(sd, prefix="encoder.")[0],
      "bottleneck": {"w": np.ones(2, np.float32)}, "decoder": {"w": np.zeros(3, np.float32)}}
  monkeypatch.setattr(weights_convert, "vitill_keys", fake)
  torch.save(state, tmp_path / "vitill.pth")
  assert convert.main(["--checkpoint", str(tmp_path / "vitill.pth"), "--out", str(tmp_path / "out")]) == 0
  assert len(calls) == 1
  tree, meta = converted.load_params(tmp_path / "out")
  assert sorted(tree) == ["bottleneck", "decoder", "encoder"]
  assert meta["source_format"] == "dinomaly-vitill" and meta["depth"] == 2
  np.testing.assert_array_equal(tree["bottleneck"]["w"], np.ones(2))


# --- --download against a local server ----------------------------------------------


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
  """127.0.0.1 server: a random ViT-S/14 as vits14 (and wrongly as vitb14), a truncated vits14_reg4."""
  root = tmp_path_factory.mktemp("mirror")
  torch.manual_seed(0)
  model = dinov2_vit.vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0)
  small = root / "dinov2_vits14" / "dinov2_vits14_pretrain.pth"
  small.parent.mkdir()
  torch.save(model.state_dict(), small)
  (root / "dinov2_vitb14").mkdir()
  shutil.copy(small, root / "dinov2_vitb14" / "dinov2_vitb14_pretrain.pth")
  (root / "dinov2_vits14" / "dinov2_vits14_reg4_pretrain.pth").write_bytes(small.read_bytes()[:5000])
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  yield f"http://127.0.0.1:{server.server_address[1]}", small
  server.shutdown()


def run_download(name, base_url, tmp_path):
  return convert.main(["--download", name, "--base-url", base_url, "--cache-dir", str(tmp_path / "cache"),
                       "--out", str(tmp_path / name)])


def test_download_verifies_and_converts(mirror, tmp_path):
  base_url, small = mirror
  assert run_download("vits14", base_url, tmp_path) == 0
  params, meta = converted.load_encoder(tmp_path / "vits14", vit="small", registers=0)
  assert (tmp_path / "cache" / "dinov2_vits14_pretrain.pth").read_bytes() == small.read_bytes()
  assert_same_params(params, weights_convert.convert_file(small)[0]["encoder"])


def test_download_errors(mirror, tmp_path, capsys):
  base_url, _ = mirror
  assert run_download("vitb14", base_url, tmp_path) == 1  # a ViT-S file under the ViT-B name
  assert "vit='small' (expected 'base')" in capsys.readouterr().err
  assert run_download("vits14_reg4", base_url, tmp_path) == 1  # truncated file
  assert "dinov2_vits14_reg4_pretrain.pth" in capsys.readouterr().err
  assert run_download("vitl14", base_url, tmp_path) == 1  # not on the server
  assert "Cannot download" in capsys.readouterr().err
  assert not (tmp_path / "cache" / "dinov2_vitl14_pretrain.pth.part").exists()


def test_official_urls(monkeypatch):
  assert download.official_url("vitb14_reg4") == (
      "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth")
  assert download.official_url("vitg14") == (
      "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_pretrain.pth")
  monkeypatch.setenv(download.BASE_URL_ENV, "http://mirror/x/")
  assert download.official_url("vits14") == "http://mirror/x/dinov2_vits14/dinov2_vits14_pretrain.pth"
  assert download.OFFICIAL_MODELS["vitl14_reg4"] == ("large", 4)
  with pytest.raises(download.DownloadError, match="vitb14_reg4"):
    download.official_url("vitx14")


def test_encoder_input_errors():
  with pytest.raises(ValueError, match="vit must be one of"):
    vit.build_encoder("huge", 0)
  with pytest.raises(ValueError, match="registers must be 0 or 4"):
    vit.build_encoder("small", 2)
  model = vit.DinoV2Encoder(embed_dim=64, depth=2, num_heads=1)
  with pytest.raises(ValueError, match="multiples of 14.*30x28"):
    model.init(jax.random.PRNGKey(0), np.zeros((1, 30, 28, 3), np.float32), [0])
  with pytest.raises(ValueError, match=r"layers must be .* \[0, 2\)"):
    model.init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 3), np.float32), [2])
