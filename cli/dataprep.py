"""`dataprep`: turn instruction data into packed, verified training shards."""

from __future__ import annotations

from cli.lazy import lazy_main

COMMANDS = {
    "convert": ("cli.convert:convert", "Convert Alpaca / src-tgt / ShareGPT / messages data to conversation JSONL."),
    "pack": ("cli.pack:pack", "Template, tokenize, mask and pack conversations into verified Arrow shards."),
    "inspect": ("cli.inspect:inspect", "Summarise a packed dataset; decode a row with its trained spans marked."),
    "merge": ("cli.merge:merge", "Join packed datasets (pack --partition parts) into one, linking shards, no copy."),
    "verify": ("cli.verify:verify", "Re-hash every shard and check every row of a packed dataset (exit 1 on problems)."),
}


main = lazy_main("dataprep", COMMANDS, "Prepare SFT data: convert -> pack (template, tokenize, mask, pack) -> inspect / verify.")


if __name__ == "__main__":
    main()
