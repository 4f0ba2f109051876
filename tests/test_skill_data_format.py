"""The step-by-step answer format: render -> parse round trips, and the parser on malformed model output."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datasets_cfg.schema import Scene
from datasets_cfg.skill_annotation import hierarchical_segments
from mose.skill_format import Segment, format_trajectory, parse_answer, parse_trajectory, render_target
from mose.skills import Taxonomy
from tests.skill_fixtures import driving_row

TAX = Taxonomy.load()


def test_round_trip_of_a_scene_target():
    row = driving_row(lane_change=True, qa=False)  # every segment templated from the structured fields
    segs = hierarchical_segments(row, TAX)
    text, spans = render_target(segs, TAX)
    # spans tile the text exactly, in order
    assert spans[0].start == 0 and spans[-1].end == len(text)
    assert all(a.end == b.start for a, b in zip(spans, spans[1:]))
    parsed = parse_answer(text, TAX)
    assert parsed.ok, parsed.errors
    assert [(s.skill, s.text) for s in parsed.segments] == [(s.skill, " ".join(s.text.split())) for s in segs]
    truth = Scene(row).future_trajectory(8, 0.5, frame="ego")[:, :2]
    np.testing.assert_allclose(parsed.trajectory, truth, atol=0.005 + 1e-9)  # two decimals
    assert parsed.trajectory_complete and parsed.trajectory[-1, 1] == pytest.approx(3.5, abs=0.01)
    assert set(parsed.sections) == {"perception", "prediction", "planning"}
    assert "Change to the left lane." in parsed.text("lateral_control")


def test_span_text_is_the_segment_line():
    segs = [Segment("vehicles", "A van.\nParked."), Segment("planning", "Careful."), Segment("trajectory", format_trajectory([[1, 2]] * 8))]
    text, spans = render_target(segs, TAX)
    by_skill = {s.skill: text[s.start:s.end] for s in spans if s.skill in ("vehicles", "trajectory")}
    assert by_skill["vehicles"] == "[vehicles] A van. Parked.\n"  # newlines inside a segment become spaces
    assert by_skill["trajectory"].startswith("[trajectory] [(1.00, 2.00)") and not text.endswith("\n")
    assert text.startswith("<perception>\n") and "<prediction>" not in text  # an empty step is left out
    with pytest.raises(KeyError):
        render_target([Segment("teleport", "x")], TAX)


@pytest.mark.parametrize("answer, errors, n_poses", [
    ("<perception>\n[vehicles] car\n</perception>\n<prediction>\nx\n</prediction>\n<planning>\n[trajectory] [(1, 2), (3, 4)]\n</planning>",
     ["trajectory has 2 readable poses, expected 8"], 2),
    ("<perception>\n[vehicles] car\n<planning>\n[trajectory] [(1, 2), (3, abc), (5, 6), (7,",
     ["<perception> is not closed before <planning>", "<planning> is not closed", "missing step <prediction>",
      "pose 2: 'abc' is not a finite number", "pose 4 is truncated", "2 readable poses"], 2),
    ("<perception>[teleport] x</perception><prediction></prediction><planning>[trajectory] [(nan, 1), (inf, 2), (1e999, 3)]</planning>",
     ["unknown skill [teleport]", "'nan' is not a finite number", "'inf' is not a finite number", "no readable pose"], None),
    ("hello <planning>[vehicles] a car\ntrajectory: [(1,1),(2,2),(3,3),(4,4),(5,5),(6,6),(7,7),(8,8),(9,9)]</planning></planning>",
     ["text outside any step", "skill [vehicles] belongs to <perception>", "</planning>", "9 readable poses"], 8),
    ("<planning>\n</planning>\n<perception>\n</perception>\n<prediction>\n</prediction>", ["steps out of order", "no trajectory"], None),
    ("<bogus>x</bogus>", ["unknown tag <bogus>", "unknown tag </bogus>", "missing step <perception>"], None),
    ("", ["missing step <perception>", "no trajectory"], None),
])
def test_malformed_answers_give_errors_not_exceptions(answer, errors, n_poses):
    parsed = parse_answer(answer, TAX)
    assert not parsed.ok
    joined = " | ".join(parsed.errors)
    for e in errors:
        assert e in joined, (e, parsed.errors)
    assert (parsed.trajectory is None) == (n_poses is None)
    if n_poses is not None:
        assert len(parsed.trajectory) == n_poses


def test_untagged_trajectory_and_headings():
    xy, hd, errs = parse_trajectory("[(1.0, 0.0, 0.1), (2.0, 0.1, 0.2)]", num_poses=2)
    assert not errs and xy.tolist() == [[1.0, 0.0], [2.0, 0.1]] and hd.tolist() == [0.1, 0.2]
    # prose with parentheses before the list (the simulator's trajectory answers) is skipped
    xy, hd, errs = parse_trajectory("Waypoints (x, y) in metres: [(1.5, 0.0), (3.0, -0.25)]", num_poses=2)
    assert not errs and xy.tolist() == [[1.5, 0.0], [3.0, -0.25]] and hd is None
    xy, hd, errs = parse_trajectory("The planned poses (x m, y m, heading rad) are: [(1.0, 0.0, 0.000), (2.0, 0.5, 0.100)]", num_poses=2)
    assert not errs and hd.tolist() == [0.0, 0.1]
    p = parse_answer("<planning>trajectory: " + format_trajectory([[k, -k] for k in range(1, 9)]) + "</planning>", TAX)
    assert p.trajectory_complete and p.trajectory[3].tolist() == [4.0, -4.0]
    assert parse_answer(None, TAX).errors == ["answer is a NoneType, not a string"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(list("<>/[]()., \n-0123456789abeilnoprst_") + ["<perception>", "</planning>", "<planning>",
                                  "[trajectory]", "[vehicles]", "trajectory: [", "nan", "(1, 2)", "1e999"]), max_size=80))
def test_parser_never_raises(pieces):
    text = "".join(pieces)
    p = parse_answer(text, TAX)
    assert isinstance(p.errors, list)
    if p.trajectory is not None:
        assert p.trajectory.ndim == 2 and p.trajectory.shape[1] == 2 and np.isfinite(p.trajectory).all()
