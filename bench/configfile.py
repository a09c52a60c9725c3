"""What a partner change and a live reload cost, by number of partners (a script, not a test).

    python3 bench/configfile.py [--partners 10,100,1000] [--repeat 5]

For a file with N [[partner]] tables (a comment on each, as an administrator writes them):
- check: the whole-file check that check-config, run and every reload do (tomllib + validation);
- set_partner: one `ConfigFile.set_partner` as the CLI and the admin API do it (tomlkit parse,
  edit, dump, whole-file check, atomic write with a backup);
- apply: `Edge.apply` of the changed configuration on a real (not started) Edge, no streams.
Best of --repeat runs, printed as a table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeproxy.checks import check_file  # noqa: E402
from edgeproxy.configfile import ConfigFile  # noqa: E402
from edgeproxy.server import Edge  # noqa: E402


def write_config(path: Path, n: int) -> None:
    lines = ['[edge]', 'domains = ["contoso.test"]', 'listen = ["127.0.0.1:5269"]',
             'dialback_secret = "bench-secret"', ""]
    for i in range(n):
        lines += ["[[partner]]", f'domain = "partner{i}.test"    # partner number {i}',
                  f'additional_domains = ["im.partner{i}.test"]', 'type = "federated"',
                  'tls = "optional"', 'sasl = "not-supported"', "dialback = true", ""]
    path.write_text("\n".join(lines))


def best(repeat: int, fn) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(n: int, repeat: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "edge.toml"
        write_config(path, n)
        cf = ConfigFile(path)
        t_check = best(repeat, lambda: check_file(path))
        flip = iter(range(10**9))

        def change() -> None:
            cf.set_partner("partner0.test", {"description": f"v{next(flip)}"}, cf.read()[1])

        t_set = best(repeat, change)
        edge = Edge(check_file(path).edge)
        new = check_file(path).edge
        t_apply = best(repeat, lambda: edge.apply(new))
    return t_check, t_set, t_apply


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--partners", default="10,100,1000")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"{'partners':>9} {'check':>10} {'set_partner':>12} {'apply':>10}")
    for n in (int(x) for x in args.partners.split(",")):
        t_check, t_set, t_apply = measure(n, args.repeat)
        print(f"{n:>9} {t_check * 1e3:>8.1f} ms {t_set * 1e3:>9.1f} ms {t_apply * 1e3:>7.2f} ms")


if __name__ == "__main__":
    main()
