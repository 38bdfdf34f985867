"""Helpers shared by the CPU test modules."""
import hashlib
import importlib
import os
import pathlib


def extension_importable(module):
    """Whether a compiled extension imports here: checked independently of the packages' own
    available(), which is code under test."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def assert_max_error(actual, expected, rtol, atol, what=""):
    """max |actual - expected| <= atol + rtol * max |expected| (computed in float64)."""
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= atol + rtol * scale, f"{what}: max error {err:.3e} (scale {scale:.3e})"


def put_in_hf_cache(cache_dir, repo_id, filename, write):
    """Store a file as huggingface_hub's download leaves it in its cache (HF_HUB_CACHE): the content in
    blobs/ named by its sha256 (an LFS file's etag), snapshots/<commit>/<filename> a relative symlink to
    it, refs/main naming that commit. `write(path)` writes the content; returns the snapshot path."""
    repo_dir = pathlib.Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex id; one per repo, shared by its files
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    partial = blobs / f"{filename}.incomplete"
    write(partial)
    digest = hashlib.sha256()
    with open(partial, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    blob = partial.rename(blobs / digest.hexdigest())
    snapshot = repo_dir / "snapshots" / commit / filename
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot
