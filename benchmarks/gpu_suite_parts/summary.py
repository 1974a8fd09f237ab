"""The short table printed last: what survives when the output is cut."""

from __future__ import annotations


def _part_status(result: dict, name: str) -> str:
    p = result["parts"].get(name, {})
    status = p.get("status", "not run")
    if status == "failed":
        err = p.get("error")
        if err:
            return f"failed: {err['type']}"
        cases = result.get(name, {})
        rows = cases.get("datasets", cases)
        first = rows.get(p["failed_cases"][0], {}).get("error", {}).get("type", "?")
        return f"failed: {len(p['failed_cases'])} case(s), first {p['failed_cases'][0]} " \
               f"({first})"
    if status == "skipped":
        return f"skipped: {p.get('reason', '')}"
    if status == "ok" and p.get("skipped_cases"):
        return f"ok, {len(p['skipped_cases'])} case(s) skipped (time)"
    return status


def _figures(result: dict, name: str) -> str:
    """One short cell of the part's headline figures ("" when its rows are not the usual)."""
    try:
        return _headline(result.get(name) or {}, name)
    except (KeyError, TypeError, ValueError, AttributeError):  # the summary must always print
        return ""


def _headline(rows: dict, name: str) -> str:
    ok = {k: v for k, v in rows.items() if isinstance(v, dict) and v.get("status") == "ok"}
    if name == "smoke":
        return f"{len(ok)}/{len(rows)} cases passed"
    if name == "tests":
        r = ok.get("pytest -m gpu")
        return r["summary"][:60] if r else ""
    if name == "prewarm":
        return "; ".join(f"{k} {v['warm_median_ms']:.1f} ms, {v['host_syncs']} syncs, "
                         f"{v.get('kernel_launches', v['aten_ops'])} "
                         f"{'kernels' if 'kernel_launches' in v else 'ops'}"
                         for k, v in ok.items() if "loop=host" not in k)
    if name == "kmeans":
        return "; ".join(f"{k} {v['ours_median_ms']:.0f} ms ({v['ours_inertia_ratio']:.2f}) vs "
                         f"{v['sklearn_median_ms']:.0f}" for k, v in ok.items())
    if name == "training":
        m = rows.get("measured") or {}
        return "; ".join(f"{b} {v:.3g}" for speeds in m.values() for b, v in speeds.items()) + \
            (" run-steps/s" if m else "")
    return ""


def summary(result: dict) -> str:
    """The short table printed last: what survives when the output is cut."""
    commit = (result.get("commit") or "unknown")[:14]
    lines = [f"GPU suite · {result['device_name']} · torch {result['torch']}"
             f"{' (CUDA ' + result['cuda'] + ')' if result.get('cuda') else ''} · commit {commit}"
             f" · {result['date']} · budget {result['budget_s']:.0f} s, took "
             f"{result.get('elapsed_s', 0):.0f} s · {result['status']}",
             "", "| part | status | s | figures |", "| --- | --- | ---: | --- |"]
    for name in result["parts"]:
        p = result["parts"][name]
        lines.append(f"| {name} | {_part_status(result, name)[:90]} | "
                     f"{p.get('seconds', 0):.1f} | {_figures(result, name)[:160]} |")
    return "\n".join(lines)


