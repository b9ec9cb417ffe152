"""Loading Stable Diffusion the quicker way gives the same bits (issue 20), and the weights' read-ahead
reads exactly the files a load reads. Tiny random models saved in fp16, as the real SD 2.1 folders are."""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from guidance import model_folder
from guidance.model_folder import read_ahead, weight_files
from guidance.stable_diffusion import StableDiffusionPrior, load_components
from tests.tiny_models import tiny_sd_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fp16_sd_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd-fp16") / "sd"
    tiny_sd_pipeline("epsilon").to(dtype=torch.float16).save_pretrained(path)
    return path


def old_components(folder: Path, dtype: torch.dtype):
    """The loading sequence before issue 20's change: the text encoder read in its file's dtype, then cast."""
    return (
        UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype),
        AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype),
        CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").to(dtype),
        CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
    )


def assert_same_bits(new: torch.nn.Module, old: torch.nn.Module) -> None:
    new_state, old_state = new.state_dict(), old.state_dict()
    assert list(new_state) == list(old_state)
    for name, tensor in new_state.items():
        assert tensor.dtype == old_state[name].dtype, name
        assert tensor.shape == old_state[name].shape, name
        # bitwise: views as integers, so that -0.0 / +0.0 or NaN payloads could not hide a difference
        width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
        assert torch.equal(tensor.contiguous().view(width), old_state[name].contiguous().view(width)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_weight_is_the_old_loaders_bits(fp16_sd_dir, dtype):
    new = load_components(str(fp16_sd_dir), dtype=dtype)
    old = old_components(fp16_sd_dir, dtype)
    for new_module, old_module in zip((new.unet, new.vae, new.text_encoder), old[:3]):
        assert all(p.dtype == dtype for p in new_module.parameters())
        assert_same_bits(new_module, old_module)
    assert new.tokenizer.get_vocab() == old[3].get_vocab()
    assert dict(new.scheduler.config) == dict(old[4].config)


def test_prompt_embeddings_are_the_old_loaders_bits(fp16_sd_dir):
    kwargs = dict(text="a bagel", negative="blurry", inverse_text="", device="cpu", dtype=torch.float32)
    new = StableDiffusionPrior(load_components(str(fp16_sd_dir), dtype=torch.float32), **kwargs)
    old = StableDiffusionPrior(load_components(str(fp16_sd_dir), dtype=torch.float32)._replace(
        text_encoder=old_components(fp16_sd_dir, torch.float32)[2]), **kwargs)
    assert sorted(new.embeddings) == ["back", "front", "neg", "null", "side"]
    for name, embedding in new.embeddings.items():
        assert embedding.shape == (1, 77, 32)
        assert torch.equal(embedding, old.embeddings[name]), name


def test_weight_files_are_those_a_load_reads(fp16_sd_dir, tmp_path):
    files = weight_files(str(fp16_sd_dir))
    assert files == [str(fp16_sd_dir / "unet" / "diffusion_pytorch_model.safetensors"),
                     str(fp16_sd_dir / "vae" / "diffusion_pytorch_model.safetensors"),
                     str(fp16_sd_dir / "text_encoder" / "model.safetensors")]
    checkpoint = tmp_path / "dreamshaper_8.safetensors"
    checkpoint.write_bytes(b"\0" * 16)
    assert weight_files(str(checkpoint)) == [str(checkpoint)]
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(b"\0" * 16)
    assert weight_files(str(renamed), is_safe_tensor=True) == [str(renamed)]
    # nothing to read ahead: the pre-flight check reports these, not the read-ahead
    assert weight_files(None) == []
    assert weight_files(str(tmp_path / "missing-folder")) == []
    assert weight_files(str(tmp_path / "missing.safetensors")) == []
    assert weight_files("https://example.com/model.safetensors") == []


def test_weight_files_of_a_cached_hub_id(fp16_sd_dir, tmp_path, monkeypatch):
    """A hub id read from the local cache: its snapshot's files, found without the network."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--tiny-sd"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot.parent.mkdir(parents=True)
    os.symlink(fp16_sd_dir, snapshot)  # the cache's snapshot files are links too
    files = weight_files("org/tiny-sd")
    assert [Path(f).relative_to(snapshot).as_posix() for f in files] == [
        "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors"]
    assert weight_files("org/not-cached") == []


def test_read_ahead_reads_every_file_once_and_changes_nothing(fp16_sd_dir, monkeypatch):
    files = weight_files(str(fp16_sd_dir))
    before = {f: (Path(f).read_bytes(), os.stat(f).st_mtime_ns) for f in files}
    real_read, read = model_folder._read_into_page_cache, []

    def spy(path):
        read.append((path, real_read(path)))
        return read[-1][1]

    monkeypatch.setattr(model_folder, "_read_into_page_cache", spy)
    thread = read_ahead(files)
    thread.join(timeout=30)
    assert not thread.is_alive() and thread.daemon
    assert read == [(f, os.path.getsize(f)) for f in files]
    assert {f: (Path(f).read_bytes(), os.stat(f).st_mtime_ns) for f in files} == before
    assert read_ahead([]) is None


@pytest.mark.skipif(not hasattr(os, "sendfile"), reason="no os.sendfile on this platform")
def test_read_into_page_cache_sends_every_byte_to_dev_null(fp16_sd_dir, monkeypatch):
    path = weight_files(str(fp16_sd_dir))[0]
    real_sendfile, sent = os.sendfile, []

    def spy(out_fd, in_fd, offset, count):
        if sys.platform == "linux":
            assert os.path.samefile(f"/proc/self/fd/{out_fd}", os.devnull)  # the bytes go nowhere
        n = real_sendfile(out_fd, in_fd, offset, min(count, 4096))  # many calls, as for a large file
        sent.append((offset, n))
        return n

    monkeypatch.setattr(os, "sendfile", spy)
    size = os.path.getsize(path)
    assert model_folder._read_into_page_cache(path) == size > 4096
    assert [offset for offset, _ in sent] == list(range(0, size, 4096))  # contiguous, no byte twice
    assert sum(n for _, n in sent) == size


def test_read_into_page_cache_falls_back_to_reads(fp16_sd_dir, monkeypatch):
    """Where sendfile is refused (macOS allows sockets only), plain reads take over from where it stopped."""
    path = weight_files(str(fp16_sd_dir))[0]
    calls = []

    def refuse_after_one(out_fd, in_fd, offset, count):
        if calls:
            raise OSError(22, "Invalid argument")
        calls.append(offset)
        return os.pread(in_fd, 1000, offset).__len__()

    opened = []
    real_open = open

    class CountingFile(io.FileIO):
        bytes_read = 0

        def readinto(self, buffer):
            n = super().readinto(buffer)
            self.bytes_read += n or 0
            return n

    def spy_open(name, mode="r", buffering=-1):
        if mode != "rb":
            return real_open(name, mode, buffering)
        opened.append(CountingFile(name, "rb"))
        return opened[-1]

    monkeypatch.setattr(os, "sendfile", refuse_after_one, raising=False)
    monkeypatch.setattr(model_folder, "_READ_AHEAD_CHUNK", 4096)
    monkeypatch.setattr("builtins.open", spy_open)
    size = os.path.getsize(path)
    assert model_folder._read_into_page_cache(path) == size
    monkeypatch.undo()
    assert calls == [0] and len(opened) == 1
    assert opened[0].closed and opened[0].bytes_read == size - 1000  # the rest after sendfile's first 1000


def test_read_ahead_of_a_vanished_file_is_silent(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.DEBUG, logger=model_folder.__name__):
        thread = read_ahead([str(tmp_path / "gone.safetensors")])
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert any("read-ahead" in r.getMessage() and "gone.safetensors" in r.getMessage() for r in caplog.records)


def test_train_starts_the_read_ahead_before_the_heavy_imports(fp16_sd_dir):
    """The read-ahead overlaps the imports only if it starts before them: the training code, diffusers and
    transformers (torch itself is imported by the config's parser already)."""
    code = (
        "import sys\n"
        "import guidance.model_folder as mf\n"
        "def spy(paths):\n"
        "    heavy = [m for m in ('training.run', 'diffusers', 'transformers') if m in sys.modules]\n"
        "    print('imported:', heavy, 'files:', [p.split('/')[-2] for p in paths], flush=True)\n"
        "    raise SystemExit(0)\n"
        "mf.read_ahead = spy\n"
        "import train\n"
        f"train.main(['--opt', 'config/bagel.yaml', 'GuidanceParams.model_key={fp16_sd_dir}'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "imported: [] files: ['unet', 'vae', 'text_encoder']" in out.stdout
