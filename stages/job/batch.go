package job

import (
	"context"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"imcloud/proto/pb"
)

// batchItem is one room message waiting in a batch.
type batchItem struct {
	proto *pb.Proto
	done  chan error

	mu   sync.Mutex
	msg  *message.Message
	gone bool // its handler stopped waiting: msg is no longer ours to touch
}

// withMsg runs fn on the item's message unless its handler gave up on it.
func (it *batchItem) withMsg(fn func(*message.Message)) {
	it.mu.Lock()
	defer it.mu.Unlock()
	if !it.gone {
		fn(it.msg)
	}
}

// roomBatcher gathers the messages for a room that arrive within a window
// (or up to a size) and delivers them together. Each message's handler
// waits for its batch's outcome, so a message is acked only once its
// batch was delivered, and a failed batch fails every message in it.
type roomBatcher struct {
	window  time.Duration
	size    int
	timeout time.Duration
	deliver func(ctx context.Context, room string, items []*batchItem) error

	mu      sync.Mutex
	pending map[string][]*batchItem
}

func newRoomBatcher(window time.Duration, size int, timeout time.Duration, deliver func(context.Context, string, []*batchItem) error) *roomBatcher {
	return &roomBatcher{window: window, size: size, timeout: timeout, deliver: deliver, pending: map[string][]*batchItem{}}
}

// add queues p for room and waits until its batch was delivered.
func (b *roomBatcher) add(ctx context.Context, room string, p *pb.Proto, msg *message.Message) error {
	it := &batchItem{proto: p, msg: msg, done: make(chan error, 1)}
	b.mu.Lock()
	items := append(b.pending[room], it)
	b.pending[room] = items
	switch {
	case len(items) >= b.size:
		delete(b.pending, room)
		go b.flush(room, items)
	case len(items) == 1:
		time.AfterFunc(b.window, func() { b.flushRoom(room, items[0]) })
	}
	b.mu.Unlock()
	select {
	case err := <-it.done:
		return err
	case <-ctx.Done():
		// The batch may still be delivered; the message will be retried
		// and, for the nodes that took it, may arrive twice.
		it.mu.Lock()
		it.gone = true
		it.mu.Unlock()
		return ctx.Err()
	}
}

// flushRoom sends room's batch when its window closes, unless the batch
// that started with first already went out for being full.
func (b *roomBatcher) flushRoom(room string, first *batchItem) {
	b.mu.Lock()
	items := b.pending[room]
	if len(items) == 0 || items[0] != first {
		b.mu.Unlock()
		return
	}
	delete(b.pending, room)
	b.mu.Unlock()
	b.flush(room, items)
}

func (b *roomBatcher) flush(room string, items []*batchItem) {
	ctx, cancel := context.WithTimeout(context.Background(), b.timeout)
	defer cancel()
	err := b.deliver(ctx, room, items)
	for _, it := range items {
		it.done <- err
	}
}
