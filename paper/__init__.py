"""The paper's method, importable and reading top to bottom in the order data flows: vqvae.py and
gpt.py (the models, section 2.3.1), alignment.py (which frames each fMRI volume's window shows, the
layer hook), encoding.py (sections 2.3.2-2.3.3), experiments.py (section 2.4). Nothing here reads
paths, records or flags: the numbered stage scripts do, and call these."""
