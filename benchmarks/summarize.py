"""Print a Markdown table of a pytest-benchmark JSON: medians and ratios to the reference.

Usage: python benchmarks/summarize.py benchmarks/results/FILE.json
"""

import json
import sys


def main(path: str) -> None:
    data = json.load(open(path))
    mi = data["machine_info"]
    print(f"Machine: {mi.get('node')}, {mi.get('cpu', {}).get('brand_raw')}, "
          f"{mi.get('cpu', {}).get('count')} cores; {data['datetime']}\n")
    groups: dict[str, list] = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    print("| group | implementation | device | median (ms) | speed-up vs baseline |")
    print("| --- | --- | --- | ---: | ---: |")
    for group, rows in sorted(groups.items()):
        base = [r for r in rows if r["extra_info"].get("impl") in ("reference", "sklearn")]
        base_median = base[0]["stats"]["median"] if base else None
        for r in sorted(rows, key=lambda r: -r["stats"]["median"]):
            info = r["extra_info"]
            med = r["stats"]["median"]
            ratio = f"{base_median / med:.1f}×" if base_median else ""
            device = info.get("device") or ("cuda" if "cuda" in info["impl"] else "cpu")
            print(f"| {group} | {info['impl']} | {device} | {1e3 * med:.2f} | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1])
