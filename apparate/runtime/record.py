"""The per-request record a user can check the accuracy constraint with.

One CSV row per answered request (``RequestLog``, written by ``Runtime(..., log_dir=DIR)``):

    request, batch, time, exit_site, propensity, observed, disagreed

exit_site: the exiting site's index, -1 for the final head; propensity: the probability that the
request's agreement with the unmodified model was observed (1 for a request that reached the
final head, or in release mode; the feedback fraction f for a request that exited in compact
mode); observed: whether it was (the final head ran for it); disagreed: whether its answer
differed from the unmodified model's (False where not observed). ``observed / propensity *
disagreed`` is an unbiased estimate of each request's disagreement, so sums of it estimate the
disagreement of any stretch of requests (``apparate report`` recomputes every statistic from this
file). ``run.json`` beside it holds the constraint, the guarantee mode and the site names.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

COLUMNS = ("request", "batch", "time", "exit_site", "propensity", "observed", "disagreed")
LOG_NAME, META_NAME = "requests_log.csv", "run.json"


class RequestLog:
    """Appends one row per request to ``DIR/requests_log.csv`` (flushed after every batch, so
    nothing answered is lost if the process dies) and writes ``DIR/run.json``. Holds no rows in
    memory; ``counts`` keeps the running totals a status report needs."""

    def __init__(self, directory, meta: dict):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / META_NAME).write_text(json.dumps(meta, indent=1))
        self._file = open(self.directory / LOG_NAME, "w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(COLUMNS)
        self.requests = self.batches = 0
        self.weighted_disagreement = 0.0  # sum of observed / propensity * disagreed

    def record(self, time: np.ndarray, exit_site: np.ndarray, propensity: np.ndarray,
               observed: np.ndarray, disagreed: np.ndarray) -> None:
        """One batch's requests, (B,) each."""
        n = int(exit_site.shape[0])
        ids = np.arange(self.requests, self.requests + n)
        self._writer.writerows(zip(ids.tolist(), [self.batches] * n,
                                   np.round(time, 6).tolist(), exit_site.tolist(),
                                   np.round(propensity, 6).tolist(),
                                   observed.astype(int).tolist(), disagreed.astype(int).tolist()))
        self._file.flush()
        self.requests += n
        self.batches += 1
        self.weighted_disagreement += float((observed & disagreed) @ (1.0 / propensity))

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_log(directory) -> tuple[dict, dict[str, np.ndarray]]:
    """(run.json, columns) of a run directory; ValueError naming the file when it is missing or
    malformed."""
    directory = Path(directory)
    meta_path, log_path = directory / META_NAME, directory / LOG_NAME
    for path in (meta_path, log_path):
        if not path.is_file():
            raise ValueError(f"{path}: missing; a run directory holds {META_NAME} and {LOG_NAME} "
                             "(Runtime(..., log_dir=DIR) writes them)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{meta_path}: not JSON ({error})") from None
    with open(log_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(header) != COLUMNS:
            raise ValueError(f"{log_path}: expected the columns {', '.join(COLUMNS)}; got {header}")
        rows = [row for row in reader if row]
    try:
        table = np.array(rows, dtype=np.float64).reshape(-1, len(COLUMNS))
    except ValueError:
        raise ValueError(f"{log_path}: a row is not numeric or has the wrong number of fields") from None
    columns = {name: table[:, i] for i, name in enumerate(COLUMNS)}
    for name in ("request", "batch", "exit_site"):
        columns[name] = columns[name].astype(np.int64)
    for name in ("observed", "disagreed"):
        columns[name] = columns[name].astype(bool)
    bad = (columns["propensity"] <= 0) | (columns["propensity"] > 1)
    if bad.any():
        raise ValueError(f"{log_path}: propensity must be in (0, 1]; row {int(np.argmax(bad)) + 1} "
                         f"has {columns['propensity'][bad][0]}")
    return meta, columns
