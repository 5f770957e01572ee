"""AssignmentProblem, Assignment and the validator: construction checks, objective, files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from openqpm.solver.problem import (
    Assignment,
    AssignmentProblem,
    InvalidAssignmentError,
    relative_gap,
    validate_assignment,
)


def _problem(**changes: Any) -> AssignmentProblem:
    """3 classes, 5 features, select 3, 2 per class; one penalised pair (1, 2) of weight 0.5."""
    arguments: dict[str, Any] = {
        "A": np.array(
            [
                [1.0, 0.5, 0.0, 0.2, 0.1],
                [0.3, 1.0, 0.4, 0.0, 0.0],
                [0.0, 0.2, 1.0, 0.6, 0.0],
            ]
        ),
        "R": np.zeros((5, 5)),
        "b": np.array([0.1, -0.1, 0.0, 0.2, 0.0]),
        "n_features": 3,
        "n_per_class": 2,
    }
    arguments["R"][1, 2] = arguments["R"][2, 1] = 0.5
    arguments.update(changes)
    return AssignmentProblem(
        arguments.pop("A"),
        arguments.pop("R"),
        arguments.pop("b"),
        arguments.pop("n_features"),
        arguments.pop("n_per_class"),
        **arguments,
    )


def _valid(problem: AssignmentProblem) -> Assignment:
    class_features = [[0, 1], [1, 2], [0, 2]]
    return Assignment(
        selected_features=[0, 1, 2],
        class_features=class_features,
        objective=problem.objective([0, 1, 2], class_features),
        method="test",
    )


def test_objective_matches_hand_computation() -> None:
    problem = _problem()
    # scale 1000 / (2 * 3); A terms 1.0 + 0.5 + 1.0 + 0.4 + 0.0 + 1.0; pair (1, 2); b 0.1 - 0.1 + 0
    expected = 1000 / 6 * 3.9 - 0.5 + 0.0
    assert problem.class_scale == pytest.approx(1000 / 6)
    assert problem.objective([0, 1, 2], [[0, 1], [1, 2], [0, 2]]) == pytest.approx(expected)
    terms = problem.objective_terms([0, 1, 2], [[0, 1], [1, 2], [0, 2]])
    assert terms["redundancy"] == pytest.approx(0.5)
    assert terms["bias"] == pytest.approx(0.0)
    first, second, weight = problem.penalised_pairs()
    assert first.tolist() == [1] and second.tolist() == [2] and weight.tolist() == [0.5]


def _asymmetric() -> np.ndarray:
    matrix = np.zeros((5, 5))
    matrix[0, 1] = 0.3
    return matrix


def _diagonal() -> np.ndarray:
    return np.eye(5) * 0.1


def _negative() -> np.ndarray:
    matrix = np.zeros((5, 5))
    matrix[0, 1] = matrix[1, 0] = -0.2
    return matrix


def _non_finite_A() -> np.ndarray:
    matrix = np.ones((3, 5))
    matrix[1, 2] = np.nan
    return matrix


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"A": np.ones(5)}, "A must have 2 dimensions"),
        ({"A": np.ones((0, 5))}, "at least one class"),
        ({"A": _non_finite_A()}, r"A must be finite, found nan at index \(1, 2\)"),
        ({"R": np.zeros((4, 4))}, "R must have shape"),
        ({"R": _asymmetric()}, "R must be symmetric"),
        ({"R": _diagonal()}, "zero diagonal"),
        ({"R": _negative()}, "non-negative"),
        ({"R": np.full((5, 5), np.inf)}, "R must be finite"),
        ({"b": np.zeros(4)}, "b must have shape"),
        ({"b": np.array([0, 0, np.inf, 0, 0])}, "b must be finite"),
        ({"A": [["a", "b"]]}, "A must be a numeric array"),
        ({"n_per_class": 4}, "n_per_class <= n_features"),
        ({"n_per_class": 0}, "1 <= n_per_class"),
        ({"n_features": 6}, "n_features <= number of features"),
        ({"n_features": 2.5}, "n_features must be an integer"),
        ({"n_features": 2, "n_per_class": 1}, r"only C\(2, 1\) = 2 sets"),
        ({"eps": float("nan")}, "eps must be finite"),
        ({"metadata": {"x": object()}}, "JSON-serialisable"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _problem(**changes)


def test_a_boolean_size_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="boolean"):
        _problem(n_per_class=True)


def test_problem_is_immutable_and_copies_its_input() -> None:
    A = np.eye(3, 5)
    problem = _problem(A=A)
    A[0, 0] = 7.0
    assert problem.A[0, 0] == 1.0
    with pytest.raises(ValueError, match="read-only"):
        problem.A[0, 0] = 2.0


def test_problem_round_trips_through_npz(tmp_path: Path) -> None:
    problem = _problem(eps=0.25, metadata={"bias": "locality", "n": 3})
    path = tmp_path / "sub" / "problem.npz"
    problem.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["problem.npz"]  # no temp file left
    loaded = AssignmentProblem.load(path)
    np.testing.assert_array_equal(loaded.A, problem.A)
    np.testing.assert_array_equal(loaded.R, problem.R)
    np.testing.assert_array_equal(loaded.b, problem.b)
    assert (loaded.n_features, loaded.n_per_class) == (3, 2)
    assert loaded.eps == 0.25 and loaded.metadata == {"bias": "locality", "n": 3}
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == ["A", "R", "b", "eps", "metadata", "n_features", "n_per_class"]


def test_problem_load_names_the_file_and_the_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "problem.npz"
    np.savez(path, A=np.eye(2), b=np.zeros(2), n_features=2, n_per_class=1)
    with pytest.raises(ValueError, match=r"problem\.npz: missing key\(s\) R"):
        AssignmentProblem.load(path)
    bad = tmp_path / "not.npz"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not.npz: not a readable npz"):
        AssignmentProblem.load(bad)
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        AssignmentProblem.load(tmp_path / "absent.npz")
    invalid = tmp_path / "invalid.npz"
    np.savez(invalid, A=np.eye(2), R=np.eye(2), b=np.zeros(2), n_features=2, n_per_class=1)
    with pytest.raises(ValueError, match="invalid.npz: R must have a zero diagonal"):
        AssignmentProblem.load(invalid)


def test_assignment_normalises_and_builds_matrices() -> None:
    assignment = Assignment([4, 1, 2], [[2, 1], [4, 2]], objective=3, bound=4.5)
    assert assignment.selected_features == [1, 2, 4]
    assert assignment.class_features == [[1, 2], [2, 4]]
    assert assignment.gap == pytest.approx(0.5)
    W = assignment.W(6)
    assert W.dtype == np.uint8 and W.shape == (2, 6)
    assert W.tolist() == [[0, 1, 1, 0, 0, 0], [0, 0, 1, 0, 1, 0]]
    assert assignment.class_feature_matrix().tolist() == [[1, 1, 0], [0, 1, 1]]
    with pytest.raises(ValueError, match="class 1 uses feature 4, outside"):
        assignment.W(4)
    with pytest.raises(ValueError, match="class 0 uses feature 3, which is not selected"):
        Assignment([1, 2], [[1, 3]], objective=0).class_feature_matrix()


def test_assignment_round_trips_through_json(tmp_path: Path) -> None:
    assignment = Assignment(
        [0, 1, 2], [[0, 1], [1, 2]], objective=2.5, bound=3.0, method="x", time_s=1.5, log=["a"]
    )
    path = tmp_path / "assignment.json"
    assignment.save(path)
    data = json.loads(path.read_text())
    assert data["n_features"] == 3 and data["n_per_class"] == 2
    assert set(data) == {
        "selected_features",
        "class_features",
        "objective",
        "bound",
        "gap",
        "method",
        "time_s",
        "log",
        "n_features",
        "n_per_class",
    }
    assert Assignment.load(path) == assignment


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "expected a JSON object"),
        ('{"selected_features": [0], "class_features": [[0]]}', "missing key 'objective'"),
        ('{"selected_features": [0.5], "class_features": [[0]], "objective": 1}', "integers"),
        ('{"selected_features": [0], "class_features": [0], "objective": 1}', "lists of integers"),
        ('{"selected_features": [0], "class_features": [[0]], "objective": "x"}', "number"),
        (
            '{"selected_features": [0], "class_features": [[0]], "objective": 1, "n_features": 2}',
            "'n_features' is 2 but the lists imply 1",
        ),
        ("{not json", "not a JSON assignment file"),
    ],
)
def test_assignment_load_rejects_malformed_files(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "assignment.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        Assignment.load(path)


def test_relative_gap() -> None:
    assert relative_gap(200.0, 202.0) == pytest.approx(0.01)
    assert relative_gap(-100.0, -99.0) == pytest.approx(0.01)
    assert relative_gap(0.0, 1e-12) == pytest.approx(1e-3)
    assert relative_gap(5.0, None) is None


def test_validator_accepts_a_valid_solution() -> None:
    problem = _problem()
    validate_assignment(problem, _valid(problem))


def _with(assignment: Assignment, **changes: Any) -> Assignment:
    fields = assignment.to_dict()
    for key in ("n_features", "n_per_class"):
        fields.pop(key)
    fields.update(changes)
    return Assignment(**fields)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"selected_features": [0, 1]}, "2 features selected, the problem asks for exactly 3"),
        ({"selected_features": [0, 1, 1]}, "feature 1 is selected twice"),
        ({"selected_features": [0, 1, 5]}, "selected feature 5 is outside"),
        ({"selected_features": [-1, 0, 1]}, "selected feature -1 is outside"),
        ({"class_features": [[0, 1], [1, 2]]}, "2 classes assigned, the problem has 3"),
        ({"class_features": [[0, 1], [1, 2], [0]]}, "class 2 has 1 features, exactly 2"),
        ({"class_features": [[0, 1], [1, 2], [0, 1, 2]]}, "class 2 has 3 features"),
        ({"class_features": [[0, 1], [1, 2], [0, 0]]}, "class 2 lists a feature twice"),
        ({"class_features": [[0, 1], [1, 3], [0, 2]]}, "class 1 uses feature 3, which is not"),
        ({"class_features": [[0, 1], [1, 2], [0, 1]]}, "classes 0 and 2 have the same features"),
        ({"objective": 1.0}, "reported objective 1.0 differs from the recomputed"),
        ({"objective": float("nan")}, "differs from the recomputed"),
    ],
)
def test_validator_rejects_each_kind_of_infeasible_result(
    changes: dict[str, Any], message: str
) -> None:
    problem = _problem()
    with pytest.raises(InvalidAssignmentError, match=message):
        validate_assignment(problem, _with(_valid(problem), **changes))


def test_validator_checks_bound_and_gap() -> None:
    problem = _problem()
    valid = _valid(problem)
    validate_assignment(problem, _with(valid, bound=valid.objective + 1.0, gap=None))
    with pytest.raises(InvalidAssignmentError, match="below the objective"):
        validate_assignment(problem, _with(valid, bound=valid.objective - 1.0, gap=None))
    with pytest.raises(InvalidAssignmentError, match="does not match"):
        validate_assignment(problem, _with(valid, bound=valid.objective + 1.0, gap=0.5))
    with pytest.raises(InvalidAssignmentError, match="without a bound"):
        validate_assignment(problem, _with(valid, bound=None, gap=0.1))
