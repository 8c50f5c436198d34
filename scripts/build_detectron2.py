"""Install Detectron2 as a pure-Python package rebuilt from the pinned `sal-detectron2` wheel.

Detectron2's authors publish no wheels. `sal-detectron2==0.7.2` carries the mid-2024
upstream tree (ViT, Swin, LazyConfig) but only as a cp310 wheel whose prebuilt `_C`
extension cannot load under other interpreters. Nothing peftseg uses needs `_C`, so we
download that exact wheel (verified by sha256), drop the extension and repackage the
`detectron2/` tree as a `py3-none-any` wheel named `detectron2`, then pip-install it.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SOURCE = "sal-detectron2==0.7.2"
SOURCE_SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
VERSION = "0.7.2"
# Detectron2's install requirements: one list, which the lock resolves too
REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "requirements" / "detectron2.in"


def requires() -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in REQUIREMENTS_FILE.read_text().splitlines())
    return [line for line in lines if line]


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def download(dest: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.10", "--disable-pip-version-check", "-q", "-d", str(dest), SOURCE],
        check=True,
    )
    (wheel,) = dest.glob("sal_detectron2-*.whl")
    actual = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if actual != SOURCE_SHA256:
        sys.exit(f"{wheel.name}: sha256 {actual} does not match the pinned {SOURCE_SHA256}; "
                 "refusing to install it. Check the package index you are using.")
    return wheel


def repack(source: Path, dest: Path) -> Path:
    dist_info = f"detectron2-{VERSION}.dist-info"
    out = dest / f"detectron2-{VERSION}-py3-none-any.whl"
    metadata = "\n".join(
        ["Metadata-Version: 2.1", "Name: detectron2", f"Version: {VERSION}",
         "Summary: Detectron2 (pure-Python rebuild of sal-detectron2 0.7.2, no _C extension)",
         "Requires-Python: >=3.8"] + [f"Requires-Dist: {r}" for r in requires()]
    ) + "\n"
    wheel_meta = "Wheel-Version: 1.0\nGenerator: peftseg\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    records = []
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            name = info.filename
            if not name.startswith("detectron2/") or name.endswith(".so") or name.endswith("/"):
                continue
            data = zin.read(info)
            zout.writestr(name, data)
            records.append(f"{name},{_record_hash(data)},{len(data)}")
        for name, text in (("METADATA", metadata), ("WHEEL", wheel_meta)):
            data = text.encode()
            zout.writestr(f"{dist_info}/{name}", data)
            records.append(f"{dist_info}/{name},{_record_hash(data)},{len(data)}")
        records.append(f"{dist_info}/RECORD,,")
        zout.writestr(f"{dist_info}/RECORD", "\n".join(records) + "\n")
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wheel = repack(download(tmp), tmp)
        # --no-deps: its requirements are in requirements/setup.lock, which setup installed (hash-checked)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        str(wheel)], check=True)


if __name__ == "__main__":
    main()
