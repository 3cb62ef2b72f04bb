"""The artifact's ``manifest.json``: what was built, from what, how, and with which files.

An artifact is a directory plus this manifest. Every stage reads and writes it; a loader trusts a directory only when
the manifest says ``status: complete`` and every engine file still has the sha256 recorded at build time.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> m = Manifest.new(d, source={"spec": "random:tiny", "sha256": "abc"})
>>> m.save(); Manifest.load(d).source["spec"]
'random:tiny'
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path

from diffaccel.optimize.artifact.errors import ArtifactError
from diffaccel.optimize.artifact.files import atomic_write_json, file_sha256
from diffaccel.optimize.artifact.roles import DENOISERS, GUIDANCE_INPUTS

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def tool_versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("diffaccel", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu",
                 "onnxscript", "tensorrt", "nvidia-modelopt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def file_entry(root: Path, path: Path) -> dict:
    return {"path": path.relative_to(root).as_posix(), "sha256": file_sha256(path), "bytes": path.stat().st_size}


class Manifest:
    """A thin, explicit wrapper around the manifest dict (kept JSON-shaped so any tool can read it)."""

    def __init__(self, root: Path, data: dict):
        self.root = Path(root)
        self.data = data

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def new(cls, root, source: dict) -> "Manifest":
        return cls(root, {"schema_version": SCHEMA_VERSION, "status": "building", "created": now(),
                          "source": source, "tools": tool_versions(), "stages": {}, "components": {}})

    @classmethod
    def load(cls, root) -> "Manifest":
        root = Path(root)
        path = root / MANIFEST
        if not root.is_dir():
            raise ArtifactError(f"{root} is not a directory; create one with: diffaccel optimize SRC -o {root}")
        if not path.is_file():
            raise ArtifactError(f"{root} has no {MANIFEST}; it is not a diffaccel artifact "
                                f"(create one with: diffaccel optimize SRC -o {root})")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{path} is unreadable ({e}); rebuild with diffaccel optimize --force") from None
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ArtifactError(f"{path} has schema {data.get('schema_version')}, this diffaccel reads "
                                f"{SCHEMA_VERSION}; rebuild it with diffaccel optimize --force")
        return cls(root, data)

    def save(self) -> None:
        self.data["updated"] = now()
        atomic_write_json(self.root / MANIFEST, self.data)

    # ---- accessors ----------------------------------------------------------------------------------------
    source = property(lambda self: self.data["source"])
    components = property(lambda self: self.data["components"])
    stages = property(lambda self: self.data["stages"])
    complete = property(lambda self: self.data.get("status") == "complete")

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)

    # ---- stages -------------------------------------------------------------------------------------------
    def stage_is_current(self, name: str, key: str) -> bool:
        """True when ``name`` ran with stage key ``key`` (see :mod:`~diffaccel.optimize.artifact.keys`) and every file it
        produced is still intact."""
        st = self.stages.get(name)
        if not st or st.get("key") != key:
            return False
        return all((self.root / f["path"]).is_file() and (self.root / f["path"]).stat().st_size == f["bytes"]
                   for f in st.get("files", []))

    def record_stage(self, name: str, config: dict, key: str, seconds: float, files: list) -> None:
        self.stages[name] = {"config": config, "key": key, "seconds": round(seconds, 3),
                             "completed": now(), "files": files}

    def invalidate_from(self, names: list) -> None:
        for n in names:
            self.stages.pop(n, None)

    # ---- verification -------------------------------------------------------------------------------------
    @property
    def built_guidance(self) -> float:
        """The guidance scale the artifact was built for (``optimize --guidance``; 7.5 before the option existed)."""
        return float((self.get("optimize_config") or {}).get("guidance", 7.5))

    @property
    def denoiser(self) -> str:
        """The denoiser's component name (``unet`` or ``transformer``): recorded at build, else the one built."""
        recorded = (self.get("pipeline") or {}).get("denoiser")
        return recorded or next((c for c in DENOISERS if c in self.components), DENOISERS[0])

    @property
    def denoiser_class(self) -> str:
        """The denoiser's diffusers class (what the drop-in's stand-in imitates); U-Nets before it was recorded."""
        return (self.get("pipeline") or {}).get("denoiser_class", "UNet2DConditionModel")

    @property
    def takes_guidance(self) -> bool:
        """Whether the denoiser takes the guidance scale as an input (an LCM U-Net's ``timestep_cond``, FLUX.1-dev's
        ``guidance``): its batch is never doubled for classifier-free guidance."""
        inputs = self.components.get(self.denoiser, {}).get("spec", {}).get("inputs", [])
        return any(t["name"] in GUIDANCE_INPUTS for t in inputs)

    @property
    def guidance_limit(self) -> "float | None":
        """The largest guidance scale the artifact serves where its denoiser was built without the classifier-free
        batch (guidance <= 1), else None. A denoiser that takes guidance as an input (:attr:`takes_guidance`) is
        never doubled, so it has no limit."""
        return self.built_guidance if self.built_guidance <= 1 and not self.takes_guidance else None

    def verify(self, components=None) -> None:
        """Raise :class:`ArtifactError` unless the artifact is complete and its engine files are unmodified."""
        if not self.complete:
            raise ArtifactError(f"{self.root} is incomplete (status {self.data.get('status')!r}: an optimize run was "
                                "interrupted or failed); re-run the same diffaccel optimize command to finish it")
        bad = []
        for name, comp in self.components.items():
            if components is not None and name not in components:
                continue
            for f in comp.get("files", []):
                p = self.root / f["path"]
                if not p.is_file():
                    bad.append(f"{f['path']} (missing)")
                elif p.stat().st_size != f["bytes"] or file_sha256(p) != f["sha256"]:
                    bad.append(f"{f['path']} (sha256 mismatch)")
        if bad:
            raise ArtifactError(f"{self.root}: engine files changed after build: {', '.join(bad)}; "
                                "rebuild with diffaccel optimize --force")
