"""The compiled fast check (jsonschema-rs) and the Python jsonschema validator agree on every value.

Validation asks the fast check first and only runs Python jsonschema for messages, so a value the
fast check accepts but jsonschema rejects would slip through unreported.
"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from aligndata.read.formats import FORMATS

text = st.one_of(st.text(max_size=8), st.sampled_from(["human", "gpt", "user", "assistant", "system", "tool",
                                                         "function_call", "observation", "developer", "text"]))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=False) | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["conversations", "messages", "from", "value", "role", "content", "chosen", "rejected",
                         "prompt", "system", "tools", "tool_calls", "function", "name", "arguments", "type",
                         "text", "tool_call_id", "id", "x"]), children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_fast_and_python_validators_agree(value):
    for fmt in FORMATS.values():
        assert fmt.is_valid(value) == fmt.validator.is_valid(value), fmt.name
