"""Run as a script: `configs/lm_pretrained.py:smoke` on a tiny random-weight Llama teacher
directory (2 layers, width 32) and a smaller student directory (1 layer, width 16), both
written here with `save_pretrained`, on a chat JSONL file written here, for the methods of
argv[1] under the parallel strategy argv[2] (mesh argv[3], if any) on however many devices XLA_FLAGS gives; prints
{method: [train loss after each step]} as JSON (`test_lm_pretrained_run.py`)."""

import json
import os
import sys
import tempfile

from configs import lm_pretrained
from kdjax.models.pretrained import tiny
from kdjax.train.config_paths import resolve_config_paths
from kdjax.train.loop import train_and_evaluate


def main():
  directory = tempfile.mkdtemp()
  data = tiny.write_chat_jsonl(os.path.join(directory, "data.jsonl"), 48)
  texts = tiny.texts_of(data)
  teacher = tiny.write_tiny_llama(os.path.join(directory, "teacher"), texts, hidden_size=32,
                                  num_layers=2)
  student = tiny.write_tiny_llama(os.path.join(directory, "student"), texts, hidden_size=16,
                                  num_layers=1, seed=1)
  results = {}
  for method in sys.argv[1].split(","):
    config = lm_pretrained.get_config(f"teacher={teacher},student={student},data={data},smoke")
    config.method, config.suite, config.parallel = method, "", sys.argv[2]
    config.mesh = sys.argv[3] if len(sys.argv) > 3 else ""  # 'model=2' for the 2-D kinds.
    run_dir = os.path.join(directory, method)
    train_and_evaluate(resolve_config_paths(config), run_dir, teacher_checkpoints=[teacher])
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    results[method] = [row["loss"] for row in rows if "loss" in row]
  print(json.dumps(results))


if __name__ == "__main__":
  main()
