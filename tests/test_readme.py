"""The README's instructions, in the order a new user follows them."""
from conftest import REPO


def section(title):
    """The text of the README's section `## title`."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    return text[start:text.index("\n## ", start + 1)]


def test_the_rom_is_imported_before_run_all_on_real_data():
    """run_all.sh renders the replays first, which needs the game's ROM in stable-retro."""
    commands = [line for line in section("Real data and a cluster").splitlines()
                if "stable_retro.import" in line or "bash run_all.sh" in line]
    assert "stable_retro.import" in commands[0] and "bash run_all.sh" in commands[1], commands
