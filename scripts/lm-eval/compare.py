"""Compares two lm-eval runs (--log_samples) sample by sample: loglikelihoods within a
tolerance, generations identical. Prints a table; exits 1 on any mismatch.

usage: python compare.py API_OUTPUT_DIR HF_OUTPUT_DIR TOLERANCE TASK...
"""

import glob
import json
import math
import os
import sys

MAX_REPORTED = 10


def newest(pattern):
    paths = sorted(glob.glob(pattern, recursive=True), key=os.path.getmtime)
    if not paths:
        sys.exit(f"check-lm-eval: nothing matches {pattern}")
    return paths[-1]


def samples(out_dir, task):
    path = newest(os.path.join(out_dir, "**", f"samples_{task}_*.jsonl"))
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {row["doc_id"]: row for row in rows}


def results(out_dir):
    with open(
        newest(os.path.join(out_dir, "**", "results_*.json")), encoding="utf-8"
    ) as f:
        return json.load(f)["results"]


def main():
    api_dir, hf_dir, tol, tasks = (
        sys.argv[1],
        sys.argv[2],
        float(sys.argv[3]),
        sys.argv[4:],
    )
    api_results, hf_results = results(api_dir), results(hf_dir)
    problems = []
    rows = []
    for task in tasks:
        api, hf = samples(api_dir, task), samples(hf_dir, task)
        if sorted(api) != sorted(hf):
            problems.append(f"{task}: doc ids differ: {sorted(api)} vs {sorted(hf)}")
        max_delta = None
        greedy_flips = 0
        generations = None
        for doc_id in sorted(set(api) & set(hf)):
            a, h = api[doc_id], hf[doc_id]
            where = f"{task} doc {doc_id}"
            if a["arguments"] != h["arguments"]:
                problems.append(
                    f"{where}: the requests differ: {a['arguments']} vs {h['arguments']}"
                )
                continue
            a_resps, h_resps = a["filtered_resps"], h["filtered_resps"]
            if len(a_resps) != len(h_resps):
                problems.append(f"{where}: {len(a_resps)} vs {len(h_resps)} responses")
                continue
            for i, (ar, hr) in enumerate(zip(a_resps, h_resps)):
                if isinstance(ar, str) or isinstance(hr, str):
                    # generate_until: the text.
                    same = ar == hr
                    generations = same if generations is None else generations and same
                    if not same:
                        problems.append(
                            f"{where}: generation differs\n"
                            f"    prompt:       {a['arguments']['gen_args_0']['arg_0']!r}\n"
                            f"    switchyard:   {ar!r}\n"
                            f"    transformers: {hr!r}"
                        )
                    continue
                # loglikelihood: [logprob, is_greedy], logged as strings.
                a_ll, h_ll = float(ar[0]), float(hr[0])
                delta = (
                    abs(a_ll - h_ll)
                    if math.isfinite(a_ll) and math.isfinite(h_ll)
                    else math.inf
                )
                max_delta = delta if max_delta is None else max(max_delta, delta)
                if not delta <= tol:
                    args = a["arguments"][f"gen_args_{i}"]
                    problems.append(
                        f"{where} choice {i}: loglikelihood {a_ll!r} (switchyard) vs {h_ll!r}"
                        f" (transformers), |delta| {delta:.3g} > {tol:g}\n"
                        f"    context: {args['arg_0']!r}  continuation: {args['arg_1']!r}"
                    )
                if str(ar[1]) != str(hr[1]):
                    greedy_flips += 1
        metrics = sorted(
            k
            for k in hf_results.get(task, {})
            if "," in k
            and "_stderr" not in k
            and isinstance(hf_results[task][k], (int, float))
        )
        for k in metrics:
            av, hv = api_results.get(task, {}).get(k), hf_results[task][k]
            if av is None or not math.isclose(av, hv, abs_tol=1e-9):
                problems.append(
                    f"{task}: {k} is {av} (switchyard) vs {hv} (transformers)"
                )
        rows.append(
            (
                task,
                str(len(api)),
                "-" if max_delta is None else f"{max_delta:.2e}",
                "-" if generations is None else ("y" if generations else "n"),
                "-" if max_delta is None else str(greedy_flips),
                ", ".join(
                    f"{k.split(',')[0]} {api_results.get(task, {}).get(k)}"
                    for k in metrics
                ),
                ", ".join(f"{k.split(',')[0]} {hf_results[task][k]}" for k in metrics),
            )
        )

    header = (
        "task",
        "samples",
        "max |Δ loglik|",
        "generations identical",
        "is_greedy flips",
        "switchyard",
        "transformers",
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    if problems:
        print(f"\nMISMATCH ({len(problems)}):")
        for p in problems[:MAX_REPORTED]:
            print("  " + p)
        if len(problems) > MAX_REPORTED:
            print(f"  ... and {len(problems) - MAX_REPORTED} more")
        sys.exit(1)
    print(
        f"\nOK: every loglikelihood within {tol:g}, every generation identical, same metrics"
    )


if __name__ == "__main__":
    main()
