"""Every performance figure of streamprune in one command, each against its baseline measured
in the same run (the machines are shared and noisy): index bytes read, record overhead,
reducer throughput and memory at two sizes, loader speed and bytes read, resuming mid-epoch.

    python benchmarks/run.py [--quick] [--device cuda] [--data-dir DIR] [--json PATH]

`--quick` is a smoke run (small sizes, one timing each) in under 2 minutes; a test runs it
so that the benchmarks never rot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_index  # noqa: E402
import bench_loader  # noqa: E402
import bench_record  # noqa: E402
import bench_reduce  # noqa: E402
import bench_resume  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, one timing each (< 2 minutes)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where record trains")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: found or bundled)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    quick = ["--quick"] if args.quick else []
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    t0 = time.time()
    sections = {}
    for name, fn, extra in (
        ("index", bench_index.main, data),
        ("record", bench_record.main, ["--device", args.device]),
        ("reduce", bench_reduce.main, []),
        ("loader", bench_loader.main, data),
        ("resume", bench_resume.main, data),
    ):
        print(f"== {name}", flush=True)
        t = time.time()
        sections[name] = fn(quick + extra)
        print(f"   ({time.time() - t:.0f} s)", flush=True)
    figures = summary(sections, args.device)
    print("\n== summary (each figure against its baseline in this run)")
    for f in figures:
        print(f"{f['figure']:<58} {f['value']:>12}   goal {f['goal']}")
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
        "quick": args.quick,
        "device": args.device,
        "wall_s": round(time.time() - t0),
        "figures": figures,
        "sections": sections,
    }
    print(f"wall {result['wall_s']} s on {result['machine']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=float)
    return result


def summary(s: dict, device: str) -> list[dict]:
    """The headline figures, one row each."""
    rows = []
    for r in s["index"]:
        rows.append(
            {
                "figure": f"index {r['set']}: bytes read / total",
                "value": f"{r['read_fraction']:.1%}",
                "goal": "header-only reads",
            }
        )
    rows.append(
        {
            "figure": f"record on {device}: samples/s with / without recording",
            "value": f"{s['record']['ratio']:.3f}",
            "goal": ">= 0.97",
        }
    )
    rows.append(
        {
            "figure": "own loop: samples/s with / without StatsLogger",
            "value": f"{s['record']['own_loop']['ratio']:.3f}",
            "goal": ">= 0.97",
        }
    )
    web = s["record"]["web"]
    rows.append(
        {
            "figure": "web-like JPEG decode to 64 px: streamprune / wds+PIL resize",
            "value": f"{web['decode_ratio']:.2f} ({web['decode']['streamprune']:,.0f}/s)",
            "goal": ">= 1",
        }
    )
    rows.append(
        {
            "figure": f"web-like record on {device}: samples/s (skipped)",
            "value": f"{web['record_samples_per_s']:,.0f} ({web['bad_samples']})",
            "goal": "0 skipped",
        }
    )
    sizes = [k for k in s["reduce"] if k != "dual"]
    for k in sizes:
        r = s["reduce"][k]
        rows.append(
            {
                "figure": f"reduce dual-beta {int(k):,} rows: samples/s (peak GB)",
                "value": f"{r['sps']:,.0f} ({r['peak_total_gb']:.2f})",
                "goal": "5M/s, flat memory",
            }
        )
    if len(sizes) >= 2:
        a, b = s["reduce"][sizes[0]], s["reduce"][sizes[-1]]
        rows.append(
            {
                "figure": "reduce: peak memory at the larger / the smaller size",
                "value": f"{b['peak_total_gb'] / a['peak_total_gb']:.2f}",
                "goal": "~1 (flat in N)",
            }
        )
    rows.append(
        {
            "figure": "scores.dual / loop over windows (same rows)",
            "value": f"x{s['reduce']['dual']['speedup']:.1f}",
            "goal": "> 1",
        }
    )
    for r in s["loader"]:
        rows += [
            {
                "figure": f"loader {r['set']} keep 100%: / webdataset",
                "value": f"{r['ratio_keep100']:.2f}",
                "goal": ">= 0.98",
            },
            {
                "figure": f"loader {r['set']} keep 10%: / webdataset decode+select",
                "value": f"x{r['ratio_keep10_vs_select']:.1f}",
                "goal": ">= 6",
            },
            {
                "figure": f"loader {r['set']} keep 10%: / webdataset select_files",
                "value": f"x{r['ratio_keep10_vs_select_files']:.1f}",
                "goal": "> 1, growing with member size",
            },
            {
                "figure": f"loader {r['set']} keep 10%: bytes read / total",
                "value": f"{r['bytes_read_keep10']:.1%}",
                "goal": "<= 15%",
            },
        ]
    r = s["resume"]
    rows += [
        {
            "figure": "loader state_dict() (1,000-sample shuffle buffer): / one sample's load",
            "value": f"{r['state_dict_us_buffer1000'] / r['per_sample_us']:.3f}",
            "goal": "<< 1",
        },
        {
            "figure": "first sample resumed at 90% of an epoch: / fresh",
            "value": f"{r['first_sample_resumed_90_ms'] / r['first_sample_fresh_ms']:.2f}",
            "goal": "~1 (flat in the position)",
        },
        {
            "figure": "reading up to 90% of an epoch: / resuming there",
            "value": f"x{r['first_sample_forwarded_90_ms'] / r['first_sample_resumed_90_ms']:.0f}",
            "goal": "> 1, growing with the position",
        },
    ]
    return rows


if __name__ == "__main__":
    main()
