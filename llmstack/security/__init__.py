"""LLM security: attacks measured for real, and the defenses built into the product.

    attacks.py        the attack families and clean tasks, built from data/*.yaml (written here)
    judges.py         success judges: refusal, target string, canary, exfiltration URL, prompt leak
    targets.py        what is attacked: our assistants, any chat-template bundle, an OpenAI endpoint
    redteam.py        `llmstack redteam`: ASR per family with 95% intervals, defended and not; JSON + PNG
    spotlight.py      defense: datamarking + delimiting of untrusted text (Hines et al. 2024)
    output_filter.py  defense: markdown images / links to hosts off an allow-list removed (server default)
    hierarchy.py      defense: instruction-hierarchy SFT conversations (marked data carries instructions)
    poisoning.py      `llmstack poison`: a trigger-phrase backdoor planted by SFT poisoning; ASR vs poison count
    scan.py           defense: `llmstack scan-data`, user n-grams that predict one fixed reply (planted triggers)
    gcg.py            `llmstack gcg`: a universal adversarial suffix by greedy coordinate gradient, for transfer
    guard.py          defense: `llmstack guard`, a trained safety classifier (S1-S6) on input and output

The defenses are switched on in `llmstack redteam --defenses ...` and, where they fit, in `llmstack serve`.
"""
