"""The per-run report: one self-contained HTML page (inline CSS, local PNGs and mp4s, no network assets) and its
figures.

The page holds a table comparing methods and runs (means over their videos, FVD per group), a chart of every
video's curves coloured by method, a per-video table, and per video a player for its copy of the mp4
(`videos/<stem>.mp4` in the report folder), its contact sheet, flow colour maps and curves.
"""

from __future__ import annotations

import html
import math
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipelines.evaluate.clip_metrics import FVDResult
from pipelines.evaluate.metrics import VideoMetrics

# (metric, column header, format) of the comparison tables; a metric no video has is left out.
TABLE_COLUMNS = (
    ("flicker", "flicker", ".4f"),
    ("motion", "motion (px/frame)", ".2f"),
    ("warp_error", "flow warp error", ".4f"),
    ("frame0_psnr", "frame-0 PSNR (dB)", ".1f"),
    ("frame0_ssim", "frame-0 SSIM", ".3f"),
    ("contrast_ratio_last_to_first", "contrast last/first quarter", ".2f"),
    ("saturation_ratio_last_to_first", "saturation last/first quarter", ".2f"),
    ("ssim_to_first.last", "SSIM to frame 0, last quarter", ".3f"),
    ("clip_to_previous", "CLIP frame-to-frame", ".3f"),
    ("clip_to_first.last", "CLIP to frame 0, last quarter", ".3f"),
    ("clip_to_conditioning.last", "CLIP to image, last quarter", ".3f"),
)

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #bbb; padding: 3px 7px; text-align: right; }
th { background: #eee; } td.text, th.text { text-align: left; }
img { max-width: 100%; display: block; margin: 0.3em 0 0.8em; }
video { max-width: 100%; max-height: 360px; display: block; margin: 0.3em 0 0.8em; }
section.video { border-top: 2px solid #ccc; margin-top: 1.5em; }
.note { color: #a33; }
"""


@dataclass
class VideoResult:
    """One evaluated video: who made it, its metrics, and its figures (paths relative to the report folder)."""

    video_id: str
    method: str
    run: str
    metrics: VideoMetrics
    figures: dict[str, str] = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    # The report's own copy of the mp4, relative to the report folder (played by a <video> element).
    video: str | None = None


@dataclass
class GroupSummary:
    """The videos of one (run, method): how many, the mean of each scalar metric, and FVD."""

    run: str
    method: str
    count: int
    means: dict[str, float]
    fvd: FVDResult


def group_key(result: VideoResult) -> tuple[str, str]:
    return result.run, result.method


def summarise_groups(results: list[VideoResult], fvd: dict[tuple[str, str], FVDResult]) -> list[GroupSummary]:
    """Mean of every scalar metric per (run, method), NaNs ignored, in sorted order."""
    groups: dict[tuple[str, str], list[VideoResult]] = defaultdict(list)
    for result in results:
        groups[group_key(result)].append(result)
    summaries = []
    for (run, method), members in sorted(groups.items()):
        names = sorted({name for member in members for name in member.metrics.scalars})
        means = {}
        for name in names:
            values = [m.metrics.scalars[name] for m in members if name in m.metrics.scalars]
            finite = [v for v in values if not math.isnan(v)]
            means[name] = float(np.mean(finite)) if finite else float("nan")
        summaries.append(GroupSummary(run, method, len(members), means, fvd.get((run, method), FVDResult(None, ""))))
    return summaries


def _cell(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "<td>&ndash;</td>"
    return f"<td>{format(value, fmt)}</td>"


def _columns(rows: list[dict[str, float]]) -> list[tuple[str, str, str]]:
    return [column for column in TABLE_COLUMNS if any(column[0] in row for row in rows)]


def _comparison_table(groups: list[GroupSummary]) -> str:
    columns = _columns([group.means for group in groups])
    head = "".join(f"<th>{html.escape(header)}</th>" for _, header, _ in columns)
    lines = [f'<table id="comparison"><tr><th class="text">run</th><th class="text">method</th><th>videos</th>'
             f"{head}<th>FVD</th></tr>"]
    for group in groups:
        cells = "".join(_cell(group.means.get(name), fmt) for name, _, fmt in columns)
        fvd = (f"<td>{group.fvd.value:.2f}</td>" if group.fvd.value is not None
               else f'<td class="text note" title="{html.escape(group.fvd.reason)}">skipped</td>')
        lines.append(f'<tr><td class="text">{html.escape(group.run)}</td><td class="text">'
                     f"{html.escape(group.method)}</td><td>{group.count}</td>{cells}{fvd}</tr>")
    return "\n".join(lines + ["</table>"])


def _video_table(results: list[VideoResult]) -> str:
    columns = _columns([result.metrics.scalars for result in results])
    head = "".join(f"<th>{html.escape(header)}</th>" for _, header, _ in columns)
    lines = [f'<table id="videos"><tr><th class="text">video</th><th class="text">run</th>'
             f'<th class="text">method</th><th>frames</th>{head}</tr>']
    for result in results:
        cells = "".join(_cell(result.metrics.scalars.get(name), fmt) for name, _, fmt in columns)
        frames = int(result.metrics.scalars.get("num_frames", 0))
        lines.append(f'<tr><td class="text"><a href="#video-{html.escape(result.video_id)}">'
                     f'{html.escape(result.video_id)}</a></td><td class="text">{html.escape(result.run)}</td>'
                     f'<td class="text">{html.escape(result.method)}</td><td>{frames}</td>{cells}</tr>')
    return "\n".join(lines + ["</table>"])


FIGURE_TITLES = {"contact_sheet": "Contact sheet", "flow": "Optical flow (hue: direction, brightness: magnitude)",
                 "curves": "Curves over frame index (dotted: quarter boundaries)"}


def _video_section(result: VideoResult) -> str:
    parts = [f'<section class="video" id="video-{html.escape(result.video_id)}">',
             f"<h3>{html.escape(result.video_id)} &mdash; {html.escape(result.method)} "
             f"({html.escape(result.run)})</h3>"]
    details = ", ".join(f"{key}={result.record[key]}" for key in ("num_frames", "fps", "seed") if key in result.record)
    parts.append(f"<p>{html.escape(details)}</p>")
    if result.video:
        parts.append(f'<video controls muted loop preload="metadata" src="{html.escape(result.video)}" '
                     f'title="{html.escape(result.video_id)}"></video>')
    for key, title in FIGURE_TITLES.items():
        if key in result.figures:
            parts.append(f"<h4>{title}</h4><img src=\"{html.escape(result.figures[key])}\" "
                         f"alt=\"{html.escape(result.video_id)} {key}\">")
    parts.append("</section>")
    return "\n".join(parts)


def render_html(title: str, results: list[VideoResult], groups: list[GroupSummary], comparison_png: str | None,
                notes: list[str]) -> str:
    """The report page as a string; image paths are relative to the page."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p>{len(results)} videos evaluated, {len(groups)} run/method groups; written {stamp}.</p>"]
    if notes:
        body.append('<ul class="note">' + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    body += ["<h2>Methods and runs</h2>", _comparison_table(groups)]
    if comparison_png:
        body.append(f'<img id="comparison-curves" src="{html.escape(comparison_png)}" alt="curves by method">')
    body += ["<h2>Videos</h2>", _video_table(results)]
    body += [_video_section(result) for result in results]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def staging_dir(final: Path) -> Path:
    """A fresh folder beside `final` to build it in; `publish_dir` then puts it in place."""
    staging = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish_dir(staging: Path, final: Path) -> Path:
    """Replace `final` with the finished `staging` folder, so a half-written report is never visible as `final`."""
    previous = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, previous)
    os.replace(staging, final)
    shutil.rmtree(previous, ignore_errors=True)
    return final
