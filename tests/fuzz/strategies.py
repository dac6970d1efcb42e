"""hypothesis strategies for makima-control/1 calls: every method, its parameters
drawn from JSON values of every type (hostile strings included), from the
values that are nearly right, and from the valid ones."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from makima import fuzz


def _paired(text: str) -> str:
    """A high surrogate then a low one is one character once written as JSON
    escapes and read back: join them here too, so the oracle sees what the daemon reads."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


# Text with what the protocols refuse inside strings: NUL and lone surrogates.
text = st.text(
    st.characters() | st.characters(categories=["Cs"]) | st.just("\x00"), max_size=24
).map(_paired)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)


def values_for(param: fuzz.Param) -> st.SearchStrategy[Any]:
    """Any JSON value, a near miss, or a valid value for ``param``; never a
    command that could run."""
    kind = param.kind
    near = st.sampled_from([*fuzz.COMMON_WRONG, *fuzz.near_misses(kind)])
    valid = st.randoms(use_true_random=False).map(lambda rng: fuzz.valid_value(kind, rng))
    strategy = json_values | near | valid
    if kind is fuzz.Kind.COMMAND:
        return strategy.map(fuzz.defang_command)
    return strategy


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A method and its parameters: each present or not, of any kind; sometimes
    one more that the method does not take."""
    method = draw(st.sampled_from(sorted(fuzz.METHODS)))
    spec = fuzz.METHODS[method]
    params: dict[str, Any] = draw(
        st.fixed_dictionaries({}, optional={name: values_for(p) for name, p in spec.items()})
    )
    if draw(st.integers(0, 9)) == 0:
        params[draw(text)] = draw(json_values)
    return method, params
