"""DeepSeek-V3: MLA attention, DeepSeekMoE routing, multi-token prediction."""
