"""Functions tests/plugin/test_channels.py runs inside contexts (imported by
name there, like remote_helpers)."""
import os
import threading
import time

import mitogen.core


def stream(sender, n):
    """A remote generator's loop: n items, then close."""
    for i in range(n):
        sender.send(i)
    sender.close()
    return n


def send_few(sender, tag, k, close=False):
    for i in range(k):
        sender.send((tag, i))
    if close:
        sender.close()
    return os.getpid()


def stream_forever(sender, started=None):
    """Sends an item every 20 ms until the context dies."""
    i = 0
    while True:
        sender.send(i)
        i += 1
        time.sleep(0.02)


def send_by_handle(handle, value):
    """Send to a handle of the master this context was NOT given a Sender for."""
    mitogen.core.Sender(mitogen.core.Context(0), handle).send(value)
    return True


def send_refused_payload(handle):
    """Send a pickle the master's restricted decoder must refuse (os.system)."""
    import pickle
    mitogen.core._send(0, handle, pickle.dumps(os.system, protocol=2))
    return True


_recv = None
_results = []
_done = threading.Event()


def make_receiver():
    """Child side: a Receiver whose Sender goes back to the master."""
    global _recv
    _recv = mitogen.core.Receiver(None)
    return _recv.to_sender()


def drain(timeout=10.0):
    """Read the receiver until the master closes it; [values], reason."""
    out = []
    while True:
        try:
            msg = _recv.get(timeout=timeout)
        except mitogen.core.ChannelError as e:
            return out, str(e)
        out.append((msg.src_id, msg.unpickle()))


def start_reader_thread():
    """Read the receiver on a thread of the child (the main thread is idle
    and reads frames; this thread waits on its latch)."""
    del _results[:]
    _done.clear()

    def run():
        try:
            for msg in _recv:
                _results.append(msg.unpickle())
        finally:
            _done.set()
    threading.Thread(target=run, daemon=True).start()
    return True


def reader_results(timeout=10.0):
    return _done.wait(timeout), list(_results)


def child_select(n_receivers, per_receiver):
    """Make receivers, return their Senders; the master fills them; then
    select_drain() reads them through mitogen.select."""
    global _sel_recvs
    _sel_recvs = [mitogen.core.Receiver(None) for _ in range(n_receivers)]
    return [r.to_sender() for r in _sel_recvs]


def select_drain(total, timeout=10.0):
    import mitogen.select
    index = dict((r.handle, i) for i, r in enumerate(_sel_recvs))
    sel = mitogen.select.Select(_sel_recvs, oneshot=False)
    out = []
    for _ in range(total):
        msg = sel.get(timeout=timeout)
        out.append((index[msg.receiver.handle], msg.unpickle()))
    return out, mitogen.select.__name__


def latch_wake_from_thread(delay):
    """The main thread (then reading frames itself) waits on a Latch that a
    thread puts into after `delay`: the put must end the wait at once."""
    latch = mitogen.core.Latch()
    threading.Timer(delay, latch.put, ('from thread',)).start()
    t0 = time.monotonic()
    value = latch.get(timeout=10)
    return value, time.monotonic() - t0


def latch_timeout(timeout):
    t0 = time.monotonic()
    try:
        mitogen.core.Latch().get(timeout=timeout)
    except mitogen.core.TimeoutError:
        return time.monotonic() - t0
    return None


def receiver_timeout(timeout):
    recv = mitogen.core.Receiver(None)
    t0 = time.monotonic()
    try:
        recv.get(timeout=timeout)
    except mitogen.core.TimeoutError:
        return time.monotonic() - t0
    finally:
        recv.close()
    return None


def get_one(timeout=10.0):
    """The next value on make_receiver()'s receiver, with its sender's id."""
    msg = _recv.get(timeout=timeout)
    return msg.src_id, msg.unpickle()
