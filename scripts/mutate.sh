#!/usr/bin/env bash
# Mutation testing (not in CI): mutmut changes the judging, metrics and selection code one small edit at a time
# and runs the fast tests that cover each edit; a mutant that leaves them green "survived".
#   scripts/mutate.sh                        -> every mutant of the modules in pyproject's [tool.mutmut]
#   scripts/mutate.sh 'pysteer.judge.*'       -> only the mutants whose names match (mutmut's own globs)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${PYSTEER_VENV:-.venv}
"$venv/bin/python" -m pip install -q --disable-pip-version-check "mutmut==3.8.1"
rm -rf mutants
# mutmut imports pysteer from its copy (mutants/): the editable install's import hook would hand back the
# unmutated source, so it is switched off for the run, and the compiled extension is copied along.
so=$("$venv/bin/python" -c "import pysteer._core as c; print(c.__file__)")
pth=$(ls "$venv"/lib/python*/site-packages/_editable_skbc_pysteer.pth)
cp "$so" pysteer/
mv "$pth" "$pth.off"
trap 'mv "$pth.off" "$pth"; rm -f pysteer/_core.*.so' EXIT
PYSTEER_TEST_THREADS=1 "$venv/bin/mutmut" run --max-children "${MUTATE_JOBS:-2}" "$@" || true
"$venv/bin/mutmut" results --all true > mutants/results.txt || true
"$venv/bin/python" - <<'PY'
import collections, re
counts = collections.Counter()
survivors = []
for line in open("mutants/results.txt"):
    m = re.match(r"\s*(\S+): (.+)$", line)
    if m and m.group(2).strip() != "not checked":
        counts[m.group(2).strip()] += 1
        if m.group(2).strip() == "survived":
            survivors.append(m.group(1))
killed, total = counts["killed"] + counts["timeout"], sum(counts.values())
print(dict(counts))
print(f"mutation score: {killed}/{total} killed or timed out ({killed / max(total, 1):.1%})")
print("survivors:", *survivors, sep="\n  ")
PY
