"""Image-folder data: captions, split, latent cache written once / reused / rebuilt, shards, bad folders."""

import os
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from training import data


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "images"
    data.make_synthetic_images(str(d), n=6, size=32, seed=0)
    return d


def test_scan_reads_captions_recursively_and_sorted(tmp_path, folder):
    sub = folder / "more"
    sub.mkdir()
    Image.new("RGB", (20, 10), (0, 255, 0)).save(sub / "Z.JPG")  # upper-case extension, no caption
    (folder / "notes.md").write_text("not an image")
    items = data.scan_images(str(folder))
    assert [os.path.relpath(i.path, folder) for i in items] == [f"img_{k:04d}.png" for k in range(6)] + ["more/Z.JPG"]
    assert items[-1].caption == ""
    assert all(" on a " in i.caption for i in items[:6])
    assert items[0].caption == (folder / "img_0000.txt").read_text().strip()


def test_synthetic_images_are_deterministic(tmp_path):
    a = data.make_synthetic_images(str(tmp_path / "a"), n=3, size=16, seed=1)
    b = data.make_synthetic_images(str(tmp_path / "b"), n=3, size=16, seed=1)
    assert [i.caption for i in a] == [i.caption for i in b]
    assert all(Path(x.path).read_bytes() == Path(y.path).read_bytes() for x, y in zip(a, b))


def test_unreadable_images_are_skipped_with_a_warning(folder):
    (folder / "broken.png").write_bytes(b"definitely not a png")
    with pytest.warns(UserWarning, match="broken.png"):
        items = data.scan_images(str(folder))
    assert len(items) == 6


def test_bad_folders_are_refused_with_clear_messages(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.scan_images(str(tmp_path / "missing"))
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        data.scan_images(str(tmp_path / "file.png"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("captions without images")
    with pytest.raises(ValueError, match="No images"):
        data.scan_images(str(tmp_path / "empty"))


def test_load_image_resizes_short_side_and_center_crops(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 10, 20))  # a blue left quarter, cropped away by the center crop
    im.save(tmp_path / "wide.png")
    x = data.load_image(str(tmp_path / "wide.png"), 16)
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    assert torch.allclose(x[0, :, 8, 8], torch.tensor([1.0, 0.0, 0.0]))
    assert x[0, 2].max() < 0.2  # no blue left after the crop


def test_split_is_deterministic_and_never_empty(folder):
    items = data.scan_images(str(folder))
    train, val = data.split_items(items, 0.25, seed=3)
    assert (train, val) == data.split_items(items, 0.25, seed=3)
    assert len(val) == 2 and len(train) == 4 and set(train).isdisjoint(val) and set(train) | set(val) == set(items)
    assert data.split_items(items, 0.25, seed=4) != (train, val)
    t2, v2 = data.split_items(items[:2], 0.01, seed=0)
    assert len(t2) == len(v2) == 1
    with pytest.raises(ValueError, match="at least 2 images"):
        data.split_items(items[:1], 0.5, seed=0)


class Encoders:
    """Counting stand-ins for VAE/text encoders (deterministic functions of their input)."""

    def __init__(self):
        self.calls = {"student": 0, "teacher": 0, "text": 0}

    def student(self, x):
        self.calls["student"] += 1
        assert x.shape[-1] == 16
        return torch.nn.functional.avg_pool2d(x, 8)[:, :2].clone()  # [B,2,2,2]

    def teacher(self, x):
        self.calls["teacher"] += 1
        assert x.shape[-1] == 32
        return torch.nn.functional.avg_pool2d(x, 8)  # [B,3,4,4]

    def text(self, captions):
        self.calls["text"] += 1
        codes = torch.tensor([[float(len(c)), float(sum(map(ord, c)) % 97)] for c in captions])
        return {"text.prompt_embeds": codes[:, None, :].repeat(1, 3, 1), "text.pooled": codes}

    def build(self, items, cache, **kw):
        return data.build_latent_cache(items, str(cache), self.student, self.teacher, self.text, 16, 32,
                                       batch_size=2, shard_size=3, **kw)


def test_cache_is_written_once_reused_and_round_trips(tmp_path, folder):
    items = data.scan_images(str(folder))
    enc = Encoders()
    assert enc.build(items, tmp_path / "cache", encoder_fingerprint="vae-a")
    assert enc.calls == {"student": 4, "teacher": 4, "text": 4}  # shards of 3 in batches of 2: 2 + 2 batches
    assert sorted(f for f in os.listdir(tmp_path / "cache") if f.startswith("shard_")) == \
        ["shard_00000.safetensors", "shard_00001.safetensors"]
    assert not enc.build(items, tmp_path / "cache", encoder_fingerprint="vae-a")
    assert enc.calls["student"] == 4  # unchanged dataset: nothing encoded again

    cache = data.LatentCache(str(tmp_path / "cache"))
    assert len(cache) == 6
    assert sorted(cache.keys) == ["student", "teacher", "text.pooled", "text.prompt_embeds"]
    b = cache.batch([4, 0, 4])
    assert b["student"].shape == (3, 2, 2, 2) and b["teacher"].shape == (3, 3, 4, 4)
    assert b["text.prompt_embeds"].shape == (3, 3, 2)
    for row, i in enumerate([4, 0, 4]):  # each row is exactly its image's encoding
        assert torch.equal(b["teacher"][row], enc.teacher(data.load_image(items[i].path, 32))[0])
        assert torch.equal(b["text.pooled"][row], enc.text([items[i].caption])["text.pooled"][0])
    with pytest.raises(IndexError, match="out of range"):
        cache.batch([6])


def test_cache_is_rebuilt_when_anything_changes(tmp_path, folder):
    items = data.scan_images(str(folder))
    enc = Encoders()
    cache_dir = tmp_path / "cache"
    enc.build(items, cache_dir)
    n = enc.calls["student"]

    # A changed image (new content, new mtime) -> full rebuild with the new pixels.
    Image.new("RGB", (32, 32), (0, 0, 0)).save(items[1].path)
    os.utime(items[1].path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert enc.build(items, cache_dir)
    assert enc.calls["student"] == 2 * n
    assert data.LatentCache(str(cache_dir)).batch([1])["teacher"].abs().max() == 0

    # A changed caption, another fingerprint, fewer images: each rebuilds.
    (folder / "img_0002.txt").write_text("a new caption")
    assert enc.build(data.scan_images(str(folder)), cache_dir)
    assert enc.build(data.scan_images(str(folder)), cache_dir, encoder_fingerprint="other vae")
    assert enc.build(items[:2], cache_dir, encoder_fingerprint="other vae")
    assert len(data.LatentCache(str(cache_dir))) == 2
    assert [f for f in os.listdir(cache_dir) if f.startswith("shard_")] == ["shard_00000.safetensors"]


def test_missing_cache_and_bad_encoders_are_reported(tmp_path, folder):
    with pytest.raises(ValueError, match="No complete latent cache"):
        data.LatentCache(str(tmp_path / "nothing"))
    items = data.scan_images(str(folder))
    enc = Encoders()
    with pytest.raises(ValueError, match="one row per image"):
        data.build_latent_cache(items, str(tmp_path / "c"), lambda x: x[:1], enc.teacher, enc.text, 16, 32)
    # The failed build left no manifest behind: the cache is not taken as valid.
    with pytest.raises(ValueError, match="No complete latent cache"):
        data.LatentCache(str(tmp_path / "c"))


def test_demo_images_are_written_by_the_first_process_only(tmp_path, monkeypatch):
    """Under `accelerate launch` (RANK set) only process 0 writes the demo images; another waits for the folder
    (which appears complete, by one rename) and gives up with a clear error if it never comes."""
    import threading

    from training.data import make_synthetic_images, make_synthetic_images_once

    folder = tmp_path / "images"
    monkeypatch.setenv("RANK", "1")
    writer = threading.Timer(0.5, make_synthetic_images, args=(str(folder), 3, 32, 0))
    writer.start()
    make_synthetic_images_once(str(folder), n=3, size=32, seed=0, timeout_s=30)  # returns once process 0 is done
    writer.join()
    assert len(list(folder.glob("*.png"))) == 3 and not (tmp_path / "images.partial").exists()
    with pytest.raises(TimeoutError, match="process 0"):
        make_synthetic_images_once(str(tmp_path / "never"), n=3, size=32, seed=0, timeout_s=0.5)
    assert not (tmp_path / "never").exists()  # process 1 wrote nothing
    monkeypatch.setenv("RANK", "0")
    make_synthetic_images_once(str(tmp_path / "own"), n=2, size=32, seed=0)
    assert len(list((tmp_path / "own").glob("*.png"))) == 2
