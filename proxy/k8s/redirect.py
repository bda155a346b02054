"""The traffic redirect the injected init container installs, as Istio's init container
does: ``python -m proxy.k8s.redirect --fhir-port 8080 --proxy-port 15080 --proxy-uid 10001``.

In the pod's network namespace (nat table, iptables or its nftables backend):

- inbound TCP to the FHIR port (from other pods, the Service, the kubelet) is redirected
  to the proxy (``PREROUTING``);
- connections made inside the pod to a local address on the FHIR port are redirected too
  (``OUTPUT``), except the proxy's own: the proxy reaches the FHIR server on
  ``127.0.0.1:<fhir port>`` as ``--proxy-uid``, and that connection must not loop back.

Rerunning it (an init container restart) leaves the same rules, not a second copy. Needs
``CAP_NET_ADMIN``; run as root in the init container.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
from collections.abc import Sequence

log = logging.getLogger(__name__)

INBOUND_CHAIN = "FHIR_AUDIT_INBOUND"
OUTPUT_CHAIN = "FHIR_AUDIT_OUTPUT"


def nat_rules(fhir_port: int, proxy_port: int, proxy_uid: int) -> str:
    """The ``iptables-restore --noflush`` input for our two chains (declaring a chain in
    that input empties it, which makes a rerun replace rather than duplicate)."""
    redirect = f"-p tcp --dport {fhir_port} -j REDIRECT --to-ports {proxy_port}"
    return "\n".join(
        [
            "*nat",
            f":{INBOUND_CHAIN} - [0:0]",
            f":{OUTPUT_CHAIN} - [0:0]",
            f"-A {INBOUND_CHAIN} {redirect}",
            f"-A {OUTPUT_CHAIN} -m owner --uid-owner {proxy_uid} -j RETURN",
            f"-A {OUTPUT_CHAIN} -m addrtype --dst-type LOCAL {redirect}",
            "COMMIT",
            "",
        ]
    )


JUMPS = (("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTPUT_CHAIN))


def install(tool: str, fhir_port: int, proxy_port: int, proxy_uid: int) -> None:
    """Install the rules with ``tool`` (``iptables`` or ``ip6tables``); raises
    ``subprocess.CalledProcessError`` when the kernel refuses."""
    subprocess.run(
        [f"{tool}-restore", "--noflush"],
        input=nat_rules(fhir_port, proxy_port, proxy_uid),
        text=True,
        check=True,
    )
    for builtin, chain in JUMPS:
        jump = ["-t", "nat", "-p", "tcp", "-j", chain]
        exists = (
            subprocess.run(
                [tool, "-C", builtin, *jump], capture_output=True, check=False
            ).returncode
            == 0
        )
        if not exists:
            subprocess.run([tool, "-A", builtin, *jump], check=True)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m proxy.k8s.redirect", description=__doc__)
    parser.add_argument("--fhir-port", type=int, required=True)
    parser.add_argument("--proxy-port", type=int, required=True)
    parser.add_argument("--proxy-uid", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        install("iptables", args.fhir_port, args.proxy_port, args.proxy_uid)
    except (OSError, subprocess.CalledProcessError) as exc:
        log.error("IPv4 redirect could not be installed: %s", exc)
        return 1
    log.info("TCP :%d -> :%d, except uid %d", args.fhir_port, args.proxy_port, args.proxy_uid)
    if shutil.which("ip6tables-restore"):
        try:
            install("ip6tables", args.fhir_port, args.proxy_port, args.proxy_uid)
        except (OSError, subprocess.CalledProcessError) as exc:
            # A pod without IPv6 has nothing to redirect there.
            log.warning("IPv6 redirect not installed: %s", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
