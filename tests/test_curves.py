"""The training curves drawn offline (metrics/curves.png): read from DVCLive's files, x in optimizer steps."""

from posttrain.report.report import plot_curves, read_curve


def write_tsv(path, name, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"step\t{name}\n" + "".join(f"{s}\t{v}\n" for s, v in rows))


def test_curves_are_read_at_their_steps(tmp_path):
    write_tsv(tmp_path / "loss.tsv", "loss", [(10, 2.5), (20, 1.25)])
    assert read_curve(tmp_path / "loss.tsv") == ([10, 20], [2.5, 1.25])


def test_the_png_overlays_what_exists_and_nothing_is_written_without_curves(tmp_path):
    live = tmp_path / "dvclive"
    out = tmp_path / "curves.png"
    assert not plot_curves(live, ["sft1", "sft2"], out) and not out.exists()
    for name in ("sft1", "sft2"):
        write_tsv(live / "sft" / name / "plots/metrics/loss.tsv", "loss", [(5, 3.0), (10, 2.0)])
    write_tsv(live / "sfte_dpo/plots/metrics/rewards/margins.tsv", "margins", [(1, 0.0), (2, 0.1)])
    assert plot_curves(live, ["sft1", "sft2", "sft3"], out)  # sft3 has no curve: left out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
