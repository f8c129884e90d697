"""Every gin file in configs/feedback parses against the real configurables (a typo in a
binding fails here), and binds no secret."""

import glob
import os

import gin
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = sorted(glob.glob(os.path.join(REPO, "configs", "feedback", "*.gin")))


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_feedback_config_parses(path):
    import rlaif_jax.feedback.audit  # noqa: F401 - registers the configurables (the stages' too: it imports them)

    gin.clear_config()
    gin.add_config_file_search_path(REPO)
    try:
        gin.parse_config_file(path)
        text = gin.config_str()
    finally:
        gin.clear_config()
    assert "api_key =" not in text.replace("api_key_env", "")
    assert "sk-" not in text


def test_there_are_configs_for_every_stage():
    names = {os.path.basename(p) for p in FILES}
    assert {"teacher_gpt4.gin", "critic_gpt4.gin", "preferences.gin", "policy_samples.gin"} <= names
