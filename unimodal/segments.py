"""Splitting one id sequence into text and image segments: the scan every processor's ``_parse``
shares (`UnimodalProcessor`'s ``<boi> codes <eoi>`` spans, Emu3's header-and-rows spans).

The processor says where text stops (a span opener, or an id that belongs only inside a span),
which ids text drops (``<bos>``/``<eos>``/``<pad>``) and how one of its spans is read; the scan
collects the text between spans, refuses (``strict``) or logs and drops what is malformed, and
keeps a span's codes wherever its reader still returns them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

# (position of a span opener) -> (codes [h, w] or None, position to go on from, problem or None)
SpanReader = Callable[[int], tuple[torch.Tensor | None, int, str | None]]


def scan_segments(
    ids: torch.Tensor,
    opens: torch.Tensor,
    stops: torch.Tensor,
    skip: torch.Tensor,
    read_span: SpanReader,
    stray: Callable[[int], str],
    strict: bool,
    logger: logging.Logger,
) -> list[list[int] | torch.Tensor]:
    """Split ``ids [T]`` into text id lists and code grids.

    Args:
        ids: one sequence ``[T]``.
        opens: bool ``[T]``, the span openers (every opener is a stop too).
        stops: bool ``[T]``, where a text segment ends: openers, and ids that belong inside a span
            only (found outside one: an error, that id is dropped).
        skip: bool ``[T]``, ids left out of text segments.
        read_span: reads the span at an opener (see `SpanReader`); codes returned together with
            a problem are kept when not ``strict`` (e.g. a full grid lacking only its end).
        stray: the message for a stop at this position that is not an opener.
        strict: raise ``ValueError`` on the first problem instead of logging it as repaired.
        logger: the caller's module logger (the repairs are logged under its name).
    """
    segments: list[list[int] | torch.Tensor] = []
    pos, length = 0, len(ids)

    def fail(message: str) -> None:
        if strict:
            raise ValueError(message)
        logger.warning("decode(strict=False) repaired an invalid sequence: %s", message)

    while pos < length:
        rest = stops[pos:].nonzero()
        stop = pos + int(rest[0]) if len(rest) else length
        text = ids[pos:stop][~skip[pos:stop]].tolist()
        if text:
            segments.append(text)
        if stop == length:
            break
        if not opens[stop]:
            fail(stray(stop))
            pos = stop + 1
            continue
        codes, pos, problem = read_span(stop)
        if problem is not None:
            fail(problem)
        if codes is not None:
            segments.append(codes)
    return segments
