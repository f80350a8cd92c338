"""The remote half of bench_channels.py: runs in upstream's and in our contexts
alike (both provide mitogen.core.Sender)."""


def stream(sender, n):
    for i in range(n):
        sender.send(i)
    sender.close()
    return n
