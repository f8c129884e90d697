#!/bin/bash
# Sequential AOT compile queue: each line of queue.txt is
#   name|model|mesh|arm|topology|glob glob ...
# A line whose name.json exists (non-empty) is skipped; lines are read afresh after each job,
# so lines appended while it runs are picked up.
. "${VENV:-.venv}/bin/activate"  # a venv with the tpu-aot extra
export TPU_SKIP_MDS_QUERY=1
cd "$(dirname "$0")/.."
R=aot_results
while true; do
  next=""
  while IFS= read -r line; do
    [[ -z "$line" || "$line" == \#* ]] && continue
    name=${line%%|*}
    if [[ ! -s $R/$name.json && ! -e $R/$name.started ]]; then next=$line; break; fi
  done < $R/queue.txt
  [[ -z "$next" ]] && break
  IFS='|' read -r name model mesh arm topo globs <<< "$next"
  touch $R/$name.started
  progs=()
  for g in $globs; do progs+=(--programs="$g"); done
  echo "$(date -u +%T) start $name" >> $R/queue.log
  start=$(date +%s)
  /usr/bin/time -v nice -n 19 python scripts/aot_compile.py --gin_file=configs/models/$model.gin \
    --gin_file=configs/mesh/$mesh.gin --gin_file=configs/experiments/paper/arms/$arm.gin \
    --topology=$topo "${progs[@]}" --json > $R/$name.json 2> $R/$name.log
  rc=$?
  echo "$(date -u +%T) done $name rc=$rc wall=$(( $(date +%s) - start ))s" >> $R/queue.log
done
echo "$(date -u +%T) queue empty" >> $R/queue.log
