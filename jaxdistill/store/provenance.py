"""What produced a results file: recorded in every eval*.json, probe.json, mine.json and
pipeline.json so that a number can be traced to its checkpoint, data and code."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess

import ml_collections


def provenance(workdir: str, config: ml_collections.ConfigDict, step: int | None) -> dict:
  """What produced a results file: the checkpoint (abs path, step; None for a summary of
  several runs), the data settings (the
  benchmark's seed and generator sizes, or the real dataset's paths), the sha256 of the whole
  config, the jaxdistill version and the git commit of its source tree when it is a checkout."""
  config_json = config.to_json_best_effort(sort_keys=True)
  try:
    version = importlib.metadata.version("jaxdistill")
  except importlib.metadata.PackageNotFoundError:
    version = None
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(__file__),
                            capture_output=True, text=True, timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    commit = None
  checkpoint = (os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
                if step is not None else None)
  return {"checkpoint": checkpoint, "step": step,
          "data": config.data.to_dict() if "data" in config else None,
          "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
          "jaxdistill_version": version, "git_commit": commit}
