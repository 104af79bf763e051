"""The multimodal process reward model (paper 3.3, appendix D).

    steps.py    step rules (lines, sentences, ...) and step-to-token alignment
    labels.py   Monte Carlo step labels (`mstar prm label`)
    encode.py   PRM inputs: prompt + response tokens, step end positions, per-token targets
    model.py    backbone + scalar head, the MSE objective
    train.py    PRM training on the policy's TrainState / optimizer / checkpoints (`mstar prm train`)
    score.py    batched step scoring, aggregation, the loop's Scorer, load / save / export (`mstar prm score`)
    verify.py   Best-of-N, weighted and majority voting, Pass@N (`mstar eval --verifier`)
    stage.py    the PRM stages of `mstar train`: label -> train -> use
"""
