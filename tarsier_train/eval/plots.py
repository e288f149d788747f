"""Grouped bar charts as PNG (per-source scores side by side) for users without W&B, drawn with Pillow so that no
plotting package is needed."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

PALETTE = ((66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188), (0, 172, 193))


def grouped_bar_chart(series: dict[str, dict[str, float]], title: str, path: str | Path,
                      value_range: tuple[float, float] = (0.0, 1.0)) -> Path:
    """One group of bars per key of the series' dicts (e.g. per source), one bar per series (e.g. recall,
    precision, F1), each bar labelled with its value; saved as PNG at `path`."""
    names = list(series)
    groups = list(dict.fromkeys(group for values in series.values() for group in values))
    bar, gap, left, top, bottom = 22, 26, 50, 60, 70
    width = max(480, left + 20 + len(groups) * (len(names) * bar + gap))
    height = 420
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 15), title, fill="black")
    for i, name in enumerate(names):  # legend
        x = left + i * 110
        draw.rectangle([x, 35, x + 12, 47], fill=PALETTE[i % len(PALETTE)])
        draw.text((x + 16, 35), name, fill="black")
    low, high = value_range
    plot_height = height - top - bottom
    base = height - bottom

    def y_of(value: float) -> float:
        return base - (min(max(value, low), high) - low) / (high - low) * plot_height

    for tick in range(6):  # axis and grid at fifths of the range
        value = low + (high - low) * tick / 5
        y = y_of(value)
        draw.line([left, y, width - 10, y], fill=(225, 225, 225))
        draw.text((5, y - 6), f"{value:.1f}", fill="black")
    for g, group in enumerate(groups):
        x0 = left + 10 + g * (len(names) * bar + gap)
        for i, name in enumerate(names):
            value = series[name].get(group)
            if value is None:
                continue
            x = x0 + i * bar
            draw.rectangle([x, y_of(value), x + bar - 3, base], fill=PALETTE[i % len(PALETTE)])
            draw.text((x, y_of(value) - 12), f"{value:.2f}"[1:] if 0 <= value < 1 else f"{value:.1f}",
                      fill="black")
        draw.text((x0, base + 8 + 14 * (g % 2)), group[:24], fill="black")
    draw.line([left, base, width - 10, base], fill="black")
    path = Path(path)
    image.save(path)
    return path
