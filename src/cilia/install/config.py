"""What `cilia install` was asked for and where everything it makes lives.

The install record (`<state-dir>/install.json`) is the only thing `cilia uninstall` and
`cilia status` need: it names every process, file, link and pin the install owns."""
from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from cilia import paths

DEFAULT_STATE_DIR = "/var/lib/cilia"
DEFAULT_RUN_DIR = "/run/cilia-host"
DEFAULT_CNI_BIN_DIR = "/opt/cni/bin"
DEFAULT_CNI_CONF_DIR = "/etc/cni/net.d"
DEFAULT_CLUSTER = "default"
DEFAULT_CLUSTER_CIDR = "10.244.0.0/16"
CONFLIST_NAME = "05-cilia.conflist"
PLUGIN_NAME = "cilia-cni"
NETWORK_NAME = "cilia"
RECORD_NAME = "install.json"

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")


class InstallError(Exception):
    """One line for the user; nothing half-done is left behind by the caller."""


def state_dir_from_env() -> str:
    return os.environ.get("CILIA_STATE_DIR") or DEFAULT_STATE_DIR


@dataclass
class InstallConfig:
    cluster: str = DEFAULT_CLUSTER
    node: str = ""
    node_ip: str = ""              # "" = the uplink's first IPv4 address
    pod_cidr: str = "auto"         # "auto" = from cilia-operator
    cluster_cidr: str = DEFAULT_CLUSTER_CIDR
    routing: str = "tunnel"
    uplink: str = ""               # "" = the device of the default route
    mtu: int = 0                   # 0 = uplink MTU (minus the VXLAN overhead in tunnel mode)
    store: str = "local"
    etcd_endpoints: list[str] = field(default_factory=list)
    cni_bin_dir: str = DEFAULT_CNI_BIN_DIR
    cni_conf_dir: str = DEFAULT_CNI_CONF_DIR
    state_dir: str = DEFAULT_STATE_DIR
    run_dir: str = DEFAULT_RUN_DIR
    netns: str = ""                # "" = the caller's network namespace

    # --- derived paths ------------------------------------------------------------------------
    @property
    def record_path(self) -> str:
        return os.path.join(self.state_dir, RECORD_NAME)

    @property
    def agent_state_dir(self) -> str:
        return os.path.join(self.state_dir, "agent")

    @property
    def log_dir(self) -> str:
        return os.path.join(self.state_dir, "log")

    @property
    def socket(self) -> str:
        return os.path.join(self.run_dir, "agent.sock")

    @property
    def pin_dir(self) -> str:
        return paths.pin_dir(self.cluster, self.node)

    @property
    def plugin_path(self) -> str:
        return os.path.join(self.cni_bin_dir, PLUGIN_NAME)

    @property
    def conflist_path(self) -> str:
        return os.path.join(self.cni_conf_dir, CONFLIST_NAME)

    def pid_file(self, what: str) -> str:
        return os.path.join(self.run_dir, f"{what}.pid")

    def store_url(self) -> str:
        if self.store == "etcd":
            return "etcd://" + ",".join(_host_port(e) for e in self.etcd_endpoints)
        return "sqlite://" + os.path.join(self.state_dir, "store.db")

    # --- checks --------------------------------------------------------------------------------
    def validate(self) -> None:
        """Everything that can be checked without touching the host, one line per problem."""
        if not _NAME_RE.match(self.cluster):
            raise InstallError(f"--cluster {self.cluster!r}: lowercase letters, digits and '-', "
                               "at most 32 characters")
        if self.node and not _NAME_RE.match(self.node):
            raise InstallError(f"--node {self.node!r}: lowercase letters, digits and '-', "
                               "at most 32 characters")
        if self.node_ip:
            try:
                ipaddress.IPv4Address(self.node_ip)
            except ValueError:
                raise InstallError(f"--node-ip {self.node_ip!r}: not an IPv4 address") from None
        for flag, cidr in (("--pod-cidr", self.pod_cidr), ("--cluster-cidr", self.cluster_cidr)):
            if flag == "--pod-cidr" and cidr == "auto":
                continue
            try:
                net = ipaddress.IPv4Network(cidr)
            except ValueError as e:
                raise InstallError(f"{flag} {cidr!r}: {e}") from None
            if net.prefixlen > 28:
                raise InstallError(f"{flag} {cidr!r}: too small (at most /28)")
        if self.routing not in ("tunnel", "native"):
            raise InstallError(f"--routing {self.routing!r}: must be tunnel or native")
        if self.store not in ("local", "etcd"):
            raise InstallError(f"--store {self.store!r}: must be local or etcd")
        if self.store == "etcd" and not self.etcd_endpoints:
            raise InstallError("--store etcd needs --etcd-endpoints URL[,URL...]")
        if self.store == "local" and self.etcd_endpoints:
            raise InstallError("--etcd-endpoints is only used with --store etcd")
        for e in self.etcd_endpoints:
            _host_port(e)
        if self.mtu and not 576 <= self.mtu <= 9000:
            raise InstallError(f"--mtu {self.mtu}: must be between 576 and 9000")
        for flag, p in (("--cni-bin-dir", self.cni_bin_dir), ("--cni-conf-dir", self.cni_conf_dir),
                        ("--state-dir", self.state_dir), ("--run-dir", self.run_dir)):
            if not os.path.isabs(p):
                raise InstallError(f"{flag} {p!r}: must be an absolute path")
            if os.path.realpath(p) == "/":
                raise InstallError(f"{flag} {p!r}: refusing the root directory")
        if os.path.realpath(self.state_dir) == os.path.realpath(self.run_dir):
            raise InstallError("--state-dir and --run-dir must differ")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "InstallConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _host_port(endpoint: str) -> str:
    """http://10.0.0.1:2379 or 10.0.0.1:2379 -> 10.0.0.1:2379 (the store URL's form)."""
    raw = endpoint.strip()
    parts = urlsplit(raw if "://" in raw else f"http://{raw}")
    if parts.scheme not in ("http", "etcd") or not parts.hostname or not parts.port \
            or parts.path not in ("", "/"):
        raise InstallError(f"--etcd-endpoints {endpoint!r}: expected http://HOST:PORT")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{parts.port}"


@dataclass
class InstallRecord:
    """The config plus what the install found and made on the host."""
    config: InstallConfig
    status: str = "installing"
    # host state before we touched it, so uninstall puts it back
    sysctls: dict[str, str] = field(default_factory=dict)
    links_before: list[str] = field(default_factory=list)
    uplink_had_clsact: bool = False
    created_dirs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def save(self) -> None:
        os.makedirs(self.config.state_dir, exist_ok=True)
        d = asdict(self)
        d["config"] = self.config.to_json()
        paths.write_atomic(self.config.record_path, json.dumps(d, indent=1, sort_keys=True))

    @classmethod
    def load(cls, state_dir: str) -> "InstallRecord | None":
        try:
            with open(os.path.join(state_dir, RECORD_NAME)) as f:
                d = json.load(f)
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise InstallError(f"{os.path.join(state_dir, RECORD_NAME)}: not JSON: {e}") from None
        cfg = InstallConfig.from_json(d.pop("config"))
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(config=cfg, **known)
