"""The install's store work, run as a short process inside the host's netns (--netns), where
the store is reachable the way the agent reaches it.

  seed    the Namespace objects pod identities refer to (kept if another node made them)
  forget  what this node put into a shared store (node entry, its ipcache entries, its pod
          CIDR and the CIDR's claim); leases would expire most of it, but not the claim
"""
from __future__ import annotations

import argparse
import sys
import time
import uuid

from cilia.install.config import InstallConfig, InstallRecord


def seed(cfg: InstallConfig) -> None:
    from cilia.kvstore import SyncStore
    from cilia.objects import encode, key
    store = SyncStore(cfg.store_url() + ("?timeout=5" if cfg.store == "etcd" else ""))
    try:
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for ns in ("default", "kube-system"):
            k = key("namespaces", None, ns)
            if store.get(k) is None:
                store.put(k, encode({
                    "apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": ns, "uid": str(uuid.uuid4()), "creationTimestamp": ts,
                                 "labels": {"kubernetes.io/metadata.name": ns}},
                    "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}))
    finally:
        store.close()


def forget(cfg: InstallConfig) -> None:
    from cilia.kvstore import SyncStore
    from cilia.objects import decode
    from cilia.operator.podcidr import claim_key, podcidr_key
    store = SyncStore(cfg.store_url() + ("?timeout=5" if cfg.store == "etcd" else ""))
    try:
        store.delete(f"/cilia/nodes/v1/{cfg.node}")
        kvs, _ = store.list("/cilia/ipcache/v1/")
        for kv in kvs:
            if decode(kv.value).get("node") == cfg.node:
                store.delete(kv.key)
        kvs, _ = store.list("/cilia/identities/v1/refs/")
        for kv in kvs:
            if kv.key.rsplit("/", 1)[-1] == cfg.node:
                store.delete(kv.key)
        got = store.get(podcidr_key(cfg.node))
        if got is not None:
            cidr = decode(got.value).get("cidr")
            store.delete(podcidr_key(cfg.node))
            if cidr:
                store.delete(claim_key(cidr))
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cilia-install-storeops")
    p.add_argument("op", choices=["seed", "forget"])
    p.add_argument("--state-dir", required=True)
    a = p.parse_args(argv)
    rec = InstallRecord.load(a.state_dir)
    if rec is None:
        print(f"no install record in {a.state_dir}", file=sys.stderr)
        return 1
    try:
        (seed if a.op == "seed" else forget)(rec.config)
    except Exception as e:  # one line for the installer to show
        print(f"{type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
