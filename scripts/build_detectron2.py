"""Install Detectron2 as a pure-Python package rebuilt from the pinned `sal-detectron2` wheel.

Detectron2's authors publish no wheels. `sal-detectron2==0.7.2` carries the mid-2024
upstream tree (ViT, Swin, LazyConfig) but only as a cp310 wheel whose prebuilt `_C`
extension cannot load under other interpreters. Nothing peftseg uses needs `_C`, so we
download that exact wheel (verified by sha256), drop the extension and repackage the
`detectron2/` tree as a `py3-none-any` wheel named `detectron2`, then pip-install it.

Each step is said as it starts (with rich's spinner and bar on a terminal when rich is
installed, which setup.sh has done by then; plain lines otherwise).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import subprocess
import sys
import tempfile
import time
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


class Say:
    """`detectron2: <step>` as each step starts; on a terminal with rich, a spinner while it runs
    and a bar over the files repacked. Plain lines where rich is missing or output is a log."""

    def __init__(self, prefix: str = "detectron2"):
        self.prefix = prefix
        try:
            from rich.console import Console

            self.console = Console(stderr=True)
        except ImportError:
            self.console = None
        self.rich = self.console is not None and self.console.is_terminal

    def line(self, text: str) -> None:
        if self.console is None:
            print(f"{self.prefix}: {text}", file=sys.stderr, flush=True)
        else:
            self.console.print(f"{self.prefix}: {text}", markup=False, highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def step(self, text: str):
        """A step that may take a while: said as it starts, its time said when it ends."""
        start = time.perf_counter()
        if self.rich:
            with self.console.status(f"{self.prefix}: {text}"):
                yield
            self.line(f"{text}: done in {time.perf_counter() - start:.0f} s")
        else:
            self.line(f"{text} ...")
            yield

    def files(self, total: int):
        """(advance, close) of a bar over `total` files: rich's on a terminal, nothing elsewhere."""
        if not self.rich:
            return (lambda: None), (lambda: None)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        bar = Progress(TextColumn(f"{self.prefix}: repacking"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("files"), console=self.console, transient=True)
        bar.start()
        task = bar.add_task("repack", total=total)
        return (lambda: bar.advance(task)), bar.stop


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


def repack(source: Path, dest: Path, say: Say | None = None) -> Path:
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
        entries = zin.infolist()
        advance, close = say.files(len(entries)) if say else ((lambda: None), (lambda: None))
        try:
            for info in entries:
                advance()
                name = info.filename
                if not name.startswith("detectron2/") or name.endswith(".so") or name.endswith("/"):
                    continue
                data = zin.read(info)
                zout.writestr(name, data)
                records.append(f"{name},{_record_hash(data)},{len(data)}")
        finally:
            close()
        for name, text in (("METADATA", metadata), ("WHEEL", wheel_meta)):
            data = text.encode()
            zout.writestr(f"{dist_info}/{name}", data)
            records.append(f"{dist_info}/{name},{_record_hash(data)},{len(data)}")
        records.append(f"{dist_info}/RECORD,,")
        zout.writestr(f"{dist_info}/RECORD", "\n".join(records) + "\n")
    return out


def main() -> None:
    say = Say()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with say.step(f"[1/3] downloading {SOURCE} from your package index and checking its sha256"):
            source = download(tmp)
        say.line(f"{source.name}: {source.stat().st_size / 2**20:.1f} MiB, sha256 {SOURCE_SHA256[:12]}… as pinned")
        with say.step("[2/3] repacking its detectron2/ tree without the compiled _C extension (py3-none-any)"):
            wheel = repack(source, tmp, say)
        with say.step(f"[3/3] installing {wheel.name} into {sys.prefix}"):
            # --no-deps: its requirements are in requirements/setup.lock, which setup installed (hash-checked)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                            str(wheel)], check=True)
    say.line(f"installed detectron2 {VERSION} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
