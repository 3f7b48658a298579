"""Stage 1: raw JSON in, validated canonical records out (reader, formats, detection, schema, rules)."""
