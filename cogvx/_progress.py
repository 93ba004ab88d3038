"""tqdm progress bars, only when asked for."""
from __future__ import annotations


def progress_bar(items, show: bool, what: str):
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=what, leave=False)
