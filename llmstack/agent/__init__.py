"""An agent over tools: plan -> tool call -> observation -> answer, in a budget, with a workspace and a memory."""
