"""The quality/speed front's pure functions (benchmarks/front.py): Pareto fronts, speed levels,
and the per-level comparison of our best setting with the peers' best."""

from __future__ import annotations

from adacorr_compile.lab.fronts import best_at, compare_levels, pareto, speed_levels


def _row(method, speedup, psnr_mean, psnr_worst=None, seed_means=None):
    return {"method": method, "speedup": speedup, "psnr_mean": psnr_mean,
            "psnr_worst": psnr_mean - 5 if psnr_worst is None else psnr_worst,
            "psnr_seed_means": seed_means or [psnr_mean]}


def test_pareto_keeps_the_undominated_rows_by_rising_speed():
    rows = [_row("a", 2.0, 40), _row("b", 3.0, 30), _row("c", 2.5, 29), _row("d", 1.5, 40), _row("e", 3.0, 30)]
    # c is beaten by b in both; d by a (as good, faster); b and e are the same point: both kept
    assert [r["method"] for r in pareto(rows)] == ["a", "b", "e"]


def test_speed_levels_run_from_one_and_a_half_to_the_fastest_peer():
    assert speed_levels(3.2) == [1.5, 2.0, 2.5, 3.0, 3.2]
    assert speed_levels(3.04) == [1.5, 2.0, 2.5, 3.0]
    assert speed_levels(2.9198) == [1.5, 2.0, 2.5, 2.91]  # rounded down: the fastest row still counts
    assert speed_levels(2.0) == [1.5, 2.0]
    assert speed_levels(1.4) == [] and speed_levels(float("nan")) == []


def test_compare_levels_names_where_ours_is_ahead_within_spread_or_behind():
    ours = [_row("o1", 2.1, 40, 35), _row("o2", 3.1, 28, 20)]
    peers = [_row("p1", 2.6, 36, 30), _row("p2", 3.2, 29, 25, seed_means=[27.5, 30.5])]
    levels = compare_levels(ours, peers, [1.5, 2.5, 3.0, 3.5])
    assert [e["verdict"] for e in levels] == [
        "ahead", "behind", "within spread (below in mean, within the peer's per-seed spread)",
        "behind: no setting of ours this fast"]
    assert levels[0]["ours"]["method"] == "o1" and levels[0]["peer"]["method"] == "p1"
    assert levels[1]["ours"]["method"] == "o2" and levels[1]["peer"]["method"] == "p1"
    assert best_at(ours, 3.2) is None
    assert compare_levels([_row("o", 3.0, 20)], [_row("p", 2.0, 30)], [2.5])[0]["verdict"] == \
        "ahead: no peer setting this fast"
    assert compare_levels([_row("o", 2.0, 30, 10)], [_row("p", 2.0, 29, 20)], [2.0])[0]["verdict"] == \
        "ahead in mean, behind in worst image"


def test_a_level_takes_the_setting_of_ours_ahead_in_both_where_the_best_mean_is_behind_on_the_worst_image():
    ours = [_row("sharp", 2.6, 27.5, 16.6), _row("safe", 2.8, 22.4, 17.8), _row("slow", 2.0, 40.0, 30.0)]
    peer = [_row("p", 2.9, 20.1, 17.3)]
    entry = compare_levels(ours, peer, [2.5])[0]
    assert entry["ours"]["method"] == "safe" and entry["verdict"] == "ahead"
    # none of ours is ahead in both: the best in the mean stays, with its verdict
    entry = compare_levels(ours[:1], peer, [2.5])[0]
    assert entry["ours"]["method"] == "sharp" and entry["verdict"] == "ahead in mean, behind in worst image"


def test_the_same_psnr_within_a_hundredth_of_a_db_is_level():
    # the same algorithm in two runtimes: equal to float round-off
    peer = [_row("p", 2.15, 41.150932, 30.675899)]
    ours = [_row("best mean", 2.06, 41.7, 29.8), _row("same rule", 2.12, 41.150931, 30.675644)]
    entry = compare_levels(ours, peer, [2.0])[0]
    assert entry["ours"]["method"] == "same rule" and entry["verdict"] == "level (within 0.01 dB in both)"
    assert compare_levels([_row("o", 2.0, 41.15, 31.5)], peer, [2.0])[0]["verdict"] == \
        "level in mean (within 0.01 dB), ahead on the worst image"
    # 0.02 dB under in the mean is past the tie (and under the peer's one per-seed mean here)
    assert compare_levels([_row("o", 2.0, 41.13, 30.7)], peer, [2.0])[0]["verdict"] == "behind"

