"""suite.md for ``ddp_resnet.suite``: the machine, one table of every item's figures against its target, the skips
and failures with their reasons, then each item's details (commands, every variant, the profile summary)."""
from __future__ import annotations

from collections.abc import Callable

VERDICT = {True: "**yes**", False: "**no**", None: "n/a"}


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ips(r: dict) -> str:
    ips = r["images_per_s"]
    digits = 0 if ips["median"] >= 100 else 1
    return f"{_num(ips['median'], digits)} ({_num(ips['min'], digits)}-{_num(ips['max'], digits)})"


def _share(r: dict) -> str:
    peak = r.get("peak")
    if not peak:
        return "peak unknown"
    return f"{100 * peak['share']:.1f}% of {peak['gpu']} {peak['precision']} ({peak['tflops']:g})"


def bench_table(rows: list[tuple[str, dict]]) -> list[str]:
    """A table of bench results: img/s median (min-max), TFLOP/s, share of peak, memory, compile state."""
    lines = ["| run | img/s median (min-max) | TFLOP/s | share of dense peak | memory MiB | compile |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, r in rows:
        lines.append(f"| {label} | {_ips(r)} | {r['tflops_per_device']:.3f} | {_share(r)} | "
                     f"{_num(r['peak_memory_mib'])} ({r['memory_kind']}) | {r['compile']} |")
    return lines


def headline(r: dict) -> tuple[str, str, str]:
    """``(ours, peer, ratio)`` cells of the summary table."""
    unit = r.get("unit")
    if r["name"] == "fast_recipe":
        ours = (f"{_num(r.get('ours'), 2)}% in {r['train_s']:.1f} s ({r['train_s_without_first_epoch']:.1f} s "
                f"without epoch 1)")
        return ours, "-", "-"
    if unit == "img/s":
        ours = _num(r["ours"], 0 if r["ours"] >= 100 else 1) + " img/s"
        peer = f"{_num(r['peer'], 0 if r['peer'] >= 100 else 1)} img/s ({r['peer_name']})"
    else:
        ours, peer = f"{r['ours']:.2f} {unit}", f"{r['peer']:.2f} {unit} ({r['peer_name']})"
    return ours, peer, "-" if r.get("ratio") is None else f"{r['ratio']:.2f}x"


def summary_table(items: list[dict]) -> list[str]:
    """One row per item: figure, ours, peer, ratio, target, verdict (or the skip / failure)."""
    lines = ["| # | item | figure | ours | peer | ratio | target | holds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n, r in enumerate(items, 1):
        if r["status"] in ("ok", "timeout"):
            ours, peer, rat = headline(r)
            verdict = VERDICT[r.get("holds")]
            if r["status"] == "timeout":
                verdict += " (timed out)"
            if r.get("aim") and r.get("holds") is not None:
                verdict += f" (aim {r['aim']['img_per_s']:,} img/s: {'met' if r['aim']['met'] else 'not met'})"
            if r.get("action") and r.get("holds") is False:
                verdict += f": {r['action']}"
            lines.append(f"| {n} | `{r['name']}` | {r.get('figure', '')} | {ours} | {peer} | {rat} | {r['target']} | "
                         f"{verdict} |")
        else:
            lines.append(f"| {n} | `{r['name']}` | {r['status']}: {r.get('reason', '')} | - | - | - | {r['target']} | "
                         f"- |")
    return lines


# --------------------------------------------------------------------------------------------- details
def _resnet50(r: dict) -> list[str]:
    lines = ["Commands:", ""] + [f"    {c}" for c in r["commands"]] + [""]
    rows = [(f"{v} {who}", r["variants"][v][who]) for v in ("eager", "compile") for who in ("ours", "torchvision")]
    lines += bench_table(rows) + [""]
    lines += [f"Ratio ours/torchvision: eager {r['variants']['eager']['ratio']:.3f}, compiled "
              f"{r['variants']['compile']['ratio']:.3f} (compile backend: {r['compile_backend']})."]
    p = r.get("profile")
    if p:
        lines += ["", f"Profile of {p['steps']} compiled steps: `{p['table']}` (trace `{p['trace']}`)."]
        if p.get("kernels"):
            lines.append(f"Device busy {p['busy_ms']:.2f} of {p['span_ms']:.2f} ms (idle {100 * p['idle_share']:.1f}%, "
                         f"{p['gaps_over_10us']} gaps > 10 us totalling {p['idle_in_gaps_over_10us_ms']:.2f} ms); "
                         f"top kernels: " + "; ".join(f"{k['name'][:60]} {k['total_us'] / 1e3:.2f} ms"
                                                      for k in p["top_kernels"][:3]))
        else:
            lines.append(p.get("note", ""))
    return lines


def _cifar_loader(r: dict) -> list[str]:
    alone = r["loader_alone"]["images_per_s"]
    return (["Command:", "", f"    {r['command']}", "", f"Data: {r['data']}; augmentation {r['augment']}, loader "
             f"{r['loader']}.", ""] + bench_table([(k, v) for k, v in r["variants"]["compile"].items()])
            + ["", f"Loader alone (no model): {_num(alone['median'])} img/s median ({_num(alone['min'])}-"
                   f"{_num(alone['max'])})."])


def _fast_recipe(r: dict) -> list[str]:
    lines = ["Command:", "", f"    {r['command']}", "", f"Data: {r['data']}. Log `{r['log']}`, metrics "
             f"`{r['metrics']}`. Training seconds: {r['train_s']:.1f} (sum of epoch_time_s), "
             f"{r['train_s_without_first_epoch']:.1f} without the first epoch (which pays for torch.compile "
             f"when it is on); "
             f"target without the first epoch: {VERDICT[r.get('holds_without_first_epoch')]}.", "",
             "| epoch | test acc % | epoch s | img/s |", "| --- | --- | --- | --- |"]
    for e in r["per_epoch"]:
        lines.append(f"| {e['epoch'] + 1} | {_num(e.get('test_acc'), 2)} | {_num(e.get('epoch_time_s'), 2)} | "
                     f"{_num(e.get('img_per_s'))} |")
    return lines


def _seeds(r: dict) -> list[str]:
    return ["Commands (ours, then the seeds' plain loop):", "", f"    {r['command']}", f"    {r['plain_command']}", "",
            f"Data: {r['data']} (plain loop: {r['plain_dataset']}).",
            f"Ours: epochs of {', '.join(f'{s:.2f}' for s in r['ours_epoch_seconds'])} s "
            f"({_num(r['ours_img_per_s'])} img/s); seeds' plain loop: "
            f"{', '.join(f'{s:.2f}' for s in r['plain_epoch_seconds'])} s ({_num(r['plain_img_per_s'])} img/s; each "
            f"epoch starts its workers, as the seeds' loop does). Ours is {r['ratio']:.1f}x faster."]


def _decode(r: dict) -> list[str]:
    t = r["tree"]
    lines = ["Commands:", ""] + [f"    {c}" for c in r["commands"].values()]
    lines += ["", f"Tree: {t['files']} generated JPEGs ({t['mean_kib']:.0f} KiB mean, ~{t['shape']['side'][0]}x"
              f"{t['shape']['side'][1]} px, {t['shape']['classes']} classes), written by {t['processes']} processes"
              + (f" in {t['seconds']:.1f} s" if t.get("generated_now") else " (reused)") + f". {r['order']}.", "",
              "| decode | img/s median (min-max) | step waits for data | loader alone img/s | memory MiB |",
              "| --- | --- | --- | --- | --- |"]
    for mode, v in r["variants"].items():
        lines.append(f"| {mode} | {_ips(v)} | {100 * v['data_wait_share']:.1f}% | "
                     f"{_num(v['loader_alone']['images_per_s']['median'])} | {_num(v['peak_memory_mib'])} |")
    lines += ["", f"Faster: **{r['faster']}** (default today: {r['default']})."
              + (f" Action: {r['action']}." if r.get("action") else ""), f"Advice: {r['advice']}"]
    return lines


DETAILS = {"resnet50_224": _resnet50, "resnet18_cifar_loader": _cifar_loader, "fast_recipe": _fast_recipe,
           "seeds_pipeline_epoch": _seeds, "imagefolder_decode": _decode}


def render(doc: dict, describe_machine: Callable[[dict], str]) -> str:
    """The whole suite.md."""
    s, items = doc["suite"], doc["items"]
    counts = {status: sum(r["status"] == status for r in items)
              for status in ("ok", "timeout", "skipped", "failed", "pending")}
    lines = ["# Benchmark suite", "",
             f"- machine: {describe_machine(s['machine'])}",
             f"- run: {'tiny' if s['tiny'] else 'full'} sizes on {s['device']} | budget {s['budget_s']:g} s, "
             f"{s['elapsed_s']:.0f} s used | started {s['started']}",
             f"- command: `{s['command']}`",
             "- items: " + ", ".join(f"{n} {status}" for status, n in counts.items() if n), "",
             *summary_table(items), "",
             "ratio: ours' speed over the peer's (> 1: ours is faster); holds: the figure meets the target.", ""]
    for n, r in enumerate(items, 1):
        lines += [f"## {n}. {r['name']}: {r['title']}", ""]
        if r["status"] in ("ok", "timeout"):
            sizes = ", ".join(f"{k}={' '.join(v) if k == 'overrides' else v}" for k, v in r["sizes"].items())
            lines += [f"Sizes ({'tiny' if s['tiny'] else 'full'}): {sizes or 'the recipe as it is'}.", ""]
            lines += DETAILS[r["name"]](r)
            lines += ["", f"Took {r['seconds']:.0f} s (estimate {r['estimate_s']:.0f} s)."]
            if r["status"] == "timeout":
                lines += [f"Timed out: {r['reason']}."]
        else:
            lines.append(f"{r['status'].capitalize()}: {r.get('reason', 'not reached yet')}.")
        lines.append("")
    return "\n".join(lines)
