"""The trainer's components: loss, balancer, optimizer, lr schedule, data, tokenizer, metrics and
logging, evaluator. Each takes only its own config section."""
