"""``make test-arm64``: the edge package on arm64, under emulation, against a cloud on this machine.

Steps (each timed; the result is written to ``$SEAMLINE_CACHE/arm64/last-run.json``):

1. host tools: ``debootstrap``, ``qemu-user-static`` and ``binfmt-support`` (Debian packages, installed with
   apt-get when missing); ``binfmt_misc`` mounted and the ``qemu-aarch64`` handler enabled (flag F: the
   emulator needs no copy inside the chroot);
2. an arm64 Debian chroot (the host's release, ``debootstrap --arch=arm64 --variant=minbase`` from the
   mirror in the host's apt sources) under ``$SEAMLINE_CACHE/arm64/rootfs``, built once and reused;
3. a virtual environment in the chroot and ``pip install CHECKOUT[edge]``: pip resolves the aarch64
   wheels (onnxruntime, numpy, grpcio, tokenizers, ...) from the package registry with the host's pip
   settings (CA bundle);
4. the demo bundle (cut on the host, cached) copied into the chroot, ``seamline cloud --model demo`` on the
   host on loopback (the chroot shares the network namespace), and ``seamline generate --bundle
   --cloud`` inside the chroot: the generation must complete with tokens served through the cloud, and
   its greedy text is compared with the same generation on the host.

Run as root (chroot, mount). ``python -m seamline.testing.arm64 [--rebuild] [--max-tokens N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = "/opt/seamline"  # inside the chroot
PROMPT = "First Citizen:\nBefore we proceed"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
PACKAGES = ["python3", "python3-venv", "ca-certificates"]


class Arm64Error(RuntimeError):
    pass


def _root() -> Path:
    from seamline.partitioner.sources import cache_root

    return cache_root() / "arm64"


def _run(cmd: list[str], timeout: float = 3600, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if out.returncode != 0:
        raise Arm64Error(f"`{' '.join(cmd)}` failed (rc {out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")
    return out


def host_tools() -> None:
    """debootstrap, qemu-aarch64-static and update-binfmts, from Debian packages."""
    if os.geteuid() != 0:
        raise Arm64Error("make test-arm64 needs root (debootstrap, chroot, mount); run it as root")
    if all(shutil.which(t) for t in ("debootstrap", "qemu-aarch64-static", "update-binfmts")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-q"], timeout=600, env=env)
    _run(["apt-get", "install", "-y", "-q", "debootstrap", "qemu-user-static", "binfmt-support"], timeout=1200, env=env)


def binfmt() -> None:
    """binfmt_misc mounted and qemu-aarch64 registered, so the kernel runs arm64 binaries through qemu."""
    if not (BINFMT / "register").exists():
        out = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True,
                             text=True, check=False)
        if out.returncode != 0:
            raise Arm64Error(f"cannot mount binfmt_misc ({out.stderr.strip()}): the kernel or the container does not "
                             "allow registering qemu for arm64 binaries; run on a host (or a privileged container)")
    handler = BINFMT / "qemu-aarch64"
    if not handler.exists():
        _run(["update-binfmts", "--enable", "qemu-aarch64"])
    if not handler.exists() or "enabled" not in handler.read_text():
        raise Arm64Error(f"{handler}: qemu-aarch64 is not registered with binfmt_misc after update-binfmts")


def mirror() -> tuple[str, str]:
    """(Debian mirror URI, release codename) from the host's apt sources and os-release."""
    codename = "bookworm"
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            codename = line.split("=", 1)[1].strip('"') or codename
    uris: list[str] = []
    for f in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if not f.is_file() or not f.name.endswith((".list", ".sources")):
            continue
        for line in f.read_text().splitlines():
            words = line.split()
            if line.startswith("URIs:"):
                uris += words[1:]
            elif words[:1] == ["deb"]:
                uris += [w for w in words[1:] if "://" in w][:1]
    main = [u for u in uris if u.rstrip("/").endswith("/debian")]
    return (main[0] if main else "http://deb.debian.org/debian"), codename


def _mounts_under(path: Path) -> list[str]:
    root = str(path.resolve())
    points = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    return sorted((p for p in points if p == root or p.startswith(root + "/")), key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """rm -r ``path`` after unmounting what a killed run left mounted in it (never delete through a bind
    mount of the host's /dev or /proc)."""
    if not path.exists():
        return
    for point in _mounts_under(path):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    if _mounts_under(path):
        raise Arm64Error(f"{path}: still has mounts ({', '.join(_mounts_under(path))}); unmount them and retry")
    shutil.rmtree(path)


def bootstrap(rootfs: Path, rebuild: bool = False) -> bool:
    """The arm64 chroot (built once); True when it was built now."""
    done = rootfs / ".seamline-bootstrap"
    if done.exists() and not rebuild:
        return False
    uri, codename = mirror()
    tmp = rootfs.with_name(rootfs.name + ".tmp")
    _remove_tree(tmp)
    _remove_tree(rootfs)
    _run(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={','.join(PACKAGES)}", codename,
          str(tmp), uri], timeout=5400)
    (tmp / ".seamline-bootstrap").write_text(json.dumps({"mirror": uri, "release": codename}) + "\n")
    tmp.rename(rootfs)
    return True


@contextlib.contextmanager
def mounted(rootfs: Path) -> Iterator[None]:
    """/proc and /dev bound into the chroot; the host's resolver, hosts and CA bundle copied in. Not /sys:
    under qemu-user, onnxruntime's CPU detection (cpuinfo) reads the host's x86 CPU entries there as an arm64
    CPU's and the interpreter dies at ``import onnxruntime`` (SIGSEGV, reproduced here with 1.32.0); without
    /sys it warns "cpuinfo_initialize failed" and runs its generic arm64 kernels. A real device has its own
    /sys and is not affected."""
    done = []
    try:
        for src, fstype in (("/proc", "proc"), ("/dev", None), ("/dev/pts", None)):
            target = rootfs / src.lstrip("/")
            target.mkdir(parents=True, exist_ok=True)
            if str(target.resolve()) in _mounts_under(target):  # left by a killed run
                subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
            cmd = ["mount", "-t", fstype, fstype, str(target)] if fstype else ["mount", "--bind", src, str(target)]
            _run(cmd)
            done.append(target)
        for f in ("/etc/resolv.conf", "/etc/hosts"):
            if Path(f).exists():
                shutil.copyfile(f, rootfs / f.lstrip("/"), follow_symlinks=True)
        ca = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
        if Path(ca).exists():
            shutil.copyfile(ca, rootfs / "etc/ssl/host-ca.crt")
        yield
    finally:
        for target in reversed(done):
            subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def chroot(rootfs: Path, *cmd: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    env = {"PATH": f"{VENV}/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root", "LANG": "C.UTF-8",
           "PIP_CERT": "/etc/ssl/host-ca.crt", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_DEFAULT_TIMEOUT": "180",
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return _run([_chroot(), str(rootfs), *cmd], timeout=timeout, env=env)


def _chroot() -> str:
    return shutil.which("chroot") or shutil.which("chroot", path="/usr/sbin:/sbin") or "/usr/sbin/chroot"


def copy_checkout(rootfs: Path) -> Path:
    """The checkout's tracked and untracked-but-not-ignored files, into the chroot's /src/seamline."""
    files = _run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard"]).stdout.splitlines()
    dst = rootfs / "src" / "seamline"
    shutil.rmtree(dst, ignore_errors=True)
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def install_edge(rootfs: Path) -> str:
    """venv + pip install /src/seamline[edge]; returns the installed onnxruntime version and machine."""
    if not (rootfs / VENV.lstrip("/") / "bin" / "python").exists():
        chroot(rootfs, "python3", "-m", "venv", VENV)
    copy_checkout(rootfs)
    chroot(rootfs, f"{VENV}/bin/pip", "install", "-q", "/src/seamline[edge]", timeout=5400)
    out = chroot(rootfs, f"{VENV}/bin/python", "-c",
                 "import platform, sys, onnxruntime, seamline.edge; print(platform.machine(), onnxruntime.__version__,"
                 " 'torch' in sys.modules)").stdout.split()
    if out[0] != "aarch64" or out[2] != "False":
        raise Arm64Error(f"inside the chroot: machine {out[0]}, torch imported {out[2]} (want aarch64, False)")
    return f"{out[0]} onnxruntime {out[1]}"


def demo_bundle() -> Path:
    """The demo model's bundle (default split), cut on the host once per demo checkpoint."""
    from seamline.partitioner.loading import model_hash, resolve_model
    from seamline.partitioner.partition import PartitionOptions, partition
    from seamline.protos.bundle import BundleError, load_bundle

    out = _root() / "bundle-demo"
    want = model_hash(resolve_model("demo"))
    with contextlib.suppress(BundleError, FileNotFoundError):
        if load_bundle(out).source_model_hash == want:
            return out
    partition(PartitionOptions(model="demo", out=out, force=True))
    return out


def generate(cmd_prefix: list[str], bundle: str, cloud: str, max_tokens: int, timeout: float) -> dict:
    out = _run([*cmd_prefix, "generate", "--bundle", bundle, "--cloud", cloud, "--max-tokens", str(max_tokens),
                "--json", PROMPT], timeout=timeout)
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m seamline.testing.arm64", description=__doc__.split("\n\n")[0])
    p.add_argument("--rebuild", action="store_true", help="build the chroot again from scratch")
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args(argv)
    from seamline.testing.procs import CloudProcess

    root = _root()
    root.mkdir(parents=True, exist_ok=True)
    rootfs = root / "rootfs"
    steps: dict[str, float] = {}
    result: dict = {"host": platform.machine(), "steps_s": steps, "passed": False}
    t0 = time.monotonic()

    def step(name: str, fn, *a):
        t = time.monotonic()
        print(f"arm64: {name} ...", flush=True)
        value = fn(*a)
        steps[name] = round(time.monotonic() - t, 1)
        print(f"arm64: {name}: {steps[name]} s", flush=True)
        return value

    cloud = None
    try:
        step("host tools", host_tools)
        step("binfmt", binfmt)
        result["chroot_built_now"] = step("debootstrap arm64", bootstrap, rootfs, args.rebuild)
        bundle = step("demo bundle", demo_bundle)
        cloud = CloudProcess("demo", timeout=300)
        with mounted(rootfs):
            result["edge_runtime"] = step("pip install seamline[edge]", install_edge, rootfs)
            target = rootfs / "tmp" / "bundle"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(bundle, target)
            address = step("cloud on loopback", lambda: cloud.address)
            arm = step("generate in the chroot", generate, [_chroot(), str(rootfs), f"{VENV}/bin/seamline"],
                       "/tmp/bundle", address, args.max_tokens, 1800)
        host = step("generate on the host", generate, [sys.executable, "-m", "seamline"], str(bundle), address,
                    args.max_tokens, 600)
        served = arm["seamline"].get("served_by", {})
        result.update(arm_text=arm["text"], host_text=host["text"], served_by=served,
                      same_text_as_host=arm["token_ids"] == host["token_ids"])
        if not arm["token_ids"] or not served.get("cloud"):
            raise Arm64Error(f"the arm64 generation did not go through the cloud: {arm}")
        result["passed"] = True
    except (Arm64Error, OSError, subprocess.TimeoutExpired) as e:
        result["error"] = str(e)
        print(f"arm64: FAILED: {e}", file=sys.stderr)
    finally:
        if cloud is not None:
            cloud.stop()
        result["total_s"] = round(time.monotonic() - t0, 1)
        (root / "last-run.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
