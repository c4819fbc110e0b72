"""Starting Ray with network discipline, and running a command where nothing can leave the machine.

Ray's processes probe cloud metadata endpoints when they start (an HTTP request to 169.254.169.254 and a name
lookup of metadata.google.internal, from the usage-stats code that guesses the cloud provider) even with usage
stats off and no dashboard, unless they find ``~/ray_bootstrap_config.yaml`` naming a provider. cdm therefore
starts an embedded Ray (:func:`ray_session`) with:

- ``RAY_USAGE_STATS_ENABLED=0`` and ``RAY_AUTH_MODE=disabled`` in the environment of every Ray process;
- ``include_dashboard=False`` and ``_node_ip_address="127.0.0.1"`` (every socket on loopback), with
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` so that Ray takes loopback as the node's address instead of finding
  the machine's outward address (Ray 2.60 otherwise "resolves" 127.0.0.1 by a UDP connect towards 8.8.8.8:53 and
  a host-name lookup);
- ``HOME`` pointing, for the Ray process tree only, at a private directory holding a
  ``ray_bootstrap_config.yaml`` with ``cluster_name: cdm-local`` and ``provider: {type: local, head_ip:
  127.0.0.1}``, so the provider is known and nothing is probed;
- its own short temporary directory (sockets, logs, object spilling), deleted when the session ends.

``strace -f -e trace=connect,sendto`` of such a run shows only 127.0.0.1 and UNIX sockets (docs/scale.md).
Tests and benchmarks also run Ray inside a network namespace that has only loopback
(:func:`loopback_only_argv`: ``unshare -n sh -c 'ip link set lo up && ...'``), so nothing can leave the machine
even if a later Ray version probes something else.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import CdmError

__all__ = ["BOOTSTRAP_CONFIG", "RAY_ENV", "REQUIRE_LOOPBACK", "foreign_addresses", "have_netns_tools",
           "loopback_only", "loopback_only_argv", "ray_home", "ray_session", "strace_argv"]

#: the environment every Ray process of cdm gets
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}
#: and an embedded (single-machine) one also: the node's address is loopback, found without probing the network
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
#: set to 1, Ray is refused outside a network namespace that has only loopback (tests, benchmarks, CI)
REQUIRE_LOOPBACK = "CDM_RAY_LOOPBACK_ONLY"
#: ~/ray_bootstrap_config.yaml of the Ray process tree: the provider is known, so no cloud metadata is probed
BOOTSTRAP_CONFIG = "cluster_name: cdm-local\nprovider:\n  type: local\n  head_ip: 127.0.0.1\n"


def ray_home(parent: str | os.PathLike | None = None) -> Path:
    """A fresh private directory with ``ray_bootstrap_config.yaml``: the ``HOME`` of a Ray process tree."""
    home = Path(tempfile.mkdtemp(prefix="cdm-ray-home-", dir=parent))
    (home / "ray_bootstrap_config.yaml").write_text(BOOTSTRAP_CONFIG)
    return home


def _require_ray():
    try:
        import ray
    except ImportError:
        raise CdmError("the Ray executor needs ray: pip install 'cdm[ray]' (ray==2.60.0), or use --executor "
                       "sequential") from None
    return ray


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None, *, address: str | None = None, num_gpus: int | None = None,
                log_to_driver: bool = False) -> Iterator[object]:
    """Ray for the block, yielding the ``ray`` module: an embedded single-machine Ray with ``num_cpus`` CPUs
    (``num_gpus``: default what Ray detects), started as the module docstring says, or a connection to an
    existing cluster at ``address`` (``host:port``; its network is its operator's). Ray is shut down after the
    block and the embedded one's private directories are deleted. Refused when Ray is already running in this
    process (cdm does not share a Ray session it did not start)."""
    ray = _require_ray()
    from ray._private import ray_constants

    if ray.is_initialized():
        raise CdmError("Ray is already initialised in this process; cdm starts and stops its own session")
    if os.environ.get(REQUIRE_LOOPBACK) == "1" and not loopback_only():
        raise CdmError(f"{REQUIRE_LOOPBACK}=1: Ray runs only inside a loopback-only network namespace here (`unshare "
                       "-n sh -c 'ip link set lo up && ...'`)")
    if num_cpus is not None and num_cpus < 1:
        raise CdmError(f"--workers must be >= 1 (got {num_cpus})")
    if address:
        with _environ(RAY_ENV):
            ray.init(address=address, log_to_driver=log_to_driver, configure_logging=False)
            try:
                yield ray
            finally:
                ray.shutdown()
        return
    base = Path(tempfile.mkdtemp(prefix="cdmray-", dir="/tmp" if os.path.isdir("/tmp") else None))  # short: sockets
    cluster = ray_constants.ENABLE_RAY_CLUSTER  # read by Ray when the node's address is asked for
    try:
        home = ray_home(base)
        ray_constants.ENABLE_RAY_CLUSTER = False  # this process; LOCAL_ENV tells the processes Ray starts
        # HOME is the private one only while Ray starts its processes (they inherit it, and the workers the
        # raylet starts inherit theirs); the driver gets its own back.
        with _environ({**RAY_ENV, **LOCAL_ENV, "HOME": str(home)}):
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     _temp_dir=str(base / "t"), log_to_driver=log_to_driver, configure_logging=False)
        try:
            yield ray
        finally:
            ray.shutdown()
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster
        shutil.rmtree(base, ignore_errors=True)


_ADDR = re.compile(r'inet_addr\("([^"]*)"\)|inet_pton\(AF_INET6?, "([^"]*)"')
_RESOLVER = re.compile(r'sun_path="[^"]*(nscd|resolve)[^"]*"')
_LOOPBACK = re.compile(r"127\.\d+\.\d+\.\d+|::1|::ffff:127\.\d+\.\d+\.\d+|0\.0\.0\.0|::")


def foreign_addresses(strace_log: str) -> list[str]:
    """The lines of an ``strace -f -e trace=connect,sendto`` log that name an IP address other than loopback, or
    reach a name-service daemon (nscd, systemd-resolved: they may query DNS for us) that answered. UNIX and netlink
    sockets otherwise stay on the machine. Empty: nothing but loopback was contacted."""
    out = []
    for line in strace_log.splitlines():
        if _RESOLVER.search(line) and "ENOENT" not in line and "ECONNREFUSED" not in line:
            out.append(line.strip())
            continue
        for m in _ADDR.finditer(line):
            addr = m.group(1) or m.group(2)
            if not _LOOPBACK.fullmatch(addr):
                out.append(line.strip())
                break
    return out


def strace_argv(argv: list[str], log: str | os.PathLike) -> list[str]:
    """``argv`` under ``strace -f -qq -e trace=connect,sendto -o LOG`` (every process and thread it starts)."""
    return ["strace", "-f", "-qq", "-e", "trace=connect,sendto", "-o", str(log), *argv]


def loopback_only() -> bool:
    """Whether this process's network namespace has no interface but loopback (read from ``/proc/self/net/dev``,
    which follows the process's namespace; ``/sys/class/net`` shows the namespace that mounted ``/sys``)."""
    try:
        lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    except OSError:
        return False
    return [ln.split(":", 1)[0].strip() for ln in lines if ":" in ln] == ["lo"]


def have_netns_tools() -> str | None:
    """None when :func:`loopback_only_argv` can run here, else why not (not root, no unshare or ip)."""
    if loopback_only():
        return None
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "a loopback-only network namespace needs root (unshare -n)"
    missing = [t for t in ("unshare", "ip", "sh") if shutil.which(t) is None]
    if missing:
        return f"a loopback-only network namespace needs {', '.join(missing)}"
    return None


def loopback_only_argv(argv: list[str]) -> list[str]:
    """``argv`` run inside a new network namespace that has only loopback (up): ``unshare -n sh -c 'ip link set
    lo up && exec ...'``. Needs root; :func:`have_netns_tools` says whether it can run."""
    return ["unshare", "-n", "sh", "-c", "ip link set lo up && exec " + shlex.join(argv)]
