"""kodalle's experiments: ``kodalle demo`` and the studies it runs (unseen words, faithfulness).

They use the library like any user would; nothing in the library imports from here.
``tiny_backbone`` builds the small stand-in tokenizers the demo's quick mode and the tests use.
"""
