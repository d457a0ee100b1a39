"""`bench chat`: its judging on written replies, its users, and a 2-user run end to end (tiny model, real server)."""

from __future__ import annotations

from bench.chat import judge, load_users, pick_users, recalled, run
from dialogue.guard import echo, words

LENA = ["My name is Lena", "I live in Porto", "my dog is called Biscuit"]


def verdicts(reply, user_text, earlier=(), before=(), facts=LENA, name="Lena"):
    found = judge(reply, user_text=user_text, earlier=list(earlier), everything_before=list(before), facts=facts,
                  name=name)
    return {kind for kind, bad in found.items() if bad}


def test_judge_catches_echoes_repeats_role_confusion_and_empties_not_answers():
    lena = "Hello! My name is Lena and I live in Porto."
    assert verdicts(lena, lena) == {"echo", "role_confusion"}  # her own fact, said as the bot's
    # with no facts known, still the user's own introduction: and "My name is Lena" gives the bot a person's name
    assert verdicts(lena, lena, facts=[], name="") == {"echo", "role_confusion"}
    assert verdicts("Sure, I live by the sea.", "Where is it nice?", facts=[], name="") == set()
    assert verdicts("Sure.", "Thanks!", earlier=["Sure."]) == {"repeat"}
    assert verdicts("Mix:\n- 1 cup of rice, cooked\n- 2 cups of stock\n- 1 cup of rice, cooked\n", "A recipe?") == {"loop"}
    assert verdicts("I have a dog called Biscuit.", "Suggest a dinner recipe.") == {"role_confusion"}
    assert verdicts(" … ", "Hello!") == {"empty"}
    assert verdicts("Your name is Lena and you live in Porto.", "What's my name and where do I live?") == set()
    assert verdicts("Try a lentil soup: onions, carrots, lentils and stock.", "Suggest a dinner recipe.") == set()


def test_judge_sees_what_the_guards_own_checks_let_through():
    # one copied sentence inside a long reply to a long message: too small a share for the guard's echo
    user = ("I had a long week at the hospital and the night shifts were hard. My dog is called Biscuit and he "
            "kept me sane, we walked by the river every morning before I slept.")
    reply = ("That sounds like a tiring week, and it is good you had company on those mornings by the water. "
             "My dog is called Biscuit. Rest well, and take the weekend slowly if you can.")
    assert echo(words(reply), words(user)).ok
    assert "echo" in verdicts(reply, user, facts=["I work in a hospital"])
    # the same reply in another conversation of the user; a fact recall did not bring back
    assert verdicts("Nice to hear from you again!", "Hi!", before=["Nice to hear from you again!"]) == {"repeat"}
    assert verdicts("Porto is where I live, by the river.", "Any plans for today?") == {"role_confusion"}


def test_a_question_is_recalled_when_every_part_is_there():
    assert recalled("Your name is Lena and you live in Porto.", [["Lena"], ["porto"]])
    assert not recalled("Your name is Lena.", [["Lena"], ["Porto"]])
    assert recalled("Your birthday is on the 9th of July.", [["July", "Jul"]])


def test_the_users_have_different_lives_and_a_held_out_part():
    users = load_users()
    assert len(users) >= 30 and len({u["name"] for u in users}) == len(users)
    assert {u["split"] for u in users} == {"tune", "heldout"} and sum(u["split"] == "heldout" for u in users) >= 8
    for user in users:
        asked = [m for m in user["second"] if m["expect"]]
        assert user["facts"] and asked and any(not m["expect"] for m in user["second"]), user["user"]
    assert any(len(m["expect"]) > 1 for u in users for m in u["second"] if m["expect"])  # compound questions
    two = pick_users(users, 2, seed=3)
    assert two == pick_users(users, 2, seed=3) and {u["split"] for u in two} == {"tune", "heldout"}
    assert len(pick_users(users, 6, seed=0)) == 6 and pick_users(users, 0, 0, "heldout") == \
        [u for u in users if u["split"] == "heldout"]


def test_bench_chat_runs_two_users_end_to_end(tiny_model_dir, home, monkeypatch):
    """Through a real `rapport serve` (tiny model): what the rules decide holds on any model, the statements
    are kept as memories and the questions are not, and the questions are answered from them."""
    from dialogue.settings import Settings

    for name, value in {"RAPPORT_MODEL": str(tiny_model_dir), "RAPPORT_DTYPE": "float32", "RAPPORT_THREADS": "1",
                        "RAPPORT_MAX_NEW_TOKENS": "12", "RAPPORT_CONTEXT_BUDGET": "512"}.items():
        monkeypatch.setenv(name, value)
    report = run(Settings(), users=2, seed=1)
    users = pick_users(load_users(), 2, seed=1)
    assert report["errors"] == 0 and report["users"] == 2
    assert report["turns"] == sum(len(u["first"]) + len(u["second"]) for u in users)
    assert set(report["by_split"]) == {"tune", "heldout"}
    assert report["path"]["cpu_class"] and report["turn_p95_s"] >= report["turn_p50_s"] > 0
    for key in ("echo_rate", "repeat_rate", "role_confusion_rate", "empty_rate"):
        assert 0 <= report[key] <= 1
    assert report["memories"] >= sum(len(u["facts"]) for u in users) - 2 and report["questions_kept_as_memory"] == 0
    assert report["recall_accuracy"] >= 0.5 and report["questions"] == sum(
        1 for u in users for m in u["second"] if m["expect"])
