package job

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"imcloud/proto/pb"
)

// roomQueues sends room pushes to each cloud node in the order they come,
// one call in flight per room and node: what arrives while a call is out
// goes in the next, as one op 9 batch (up to size). Bundles made room
// pushes arrive by the hundred at once; sent as independent calls, up to
// a thousand of one room were in flight to a node together and reached it
// in any order, past what its orderer holds for a stream (1,024), which
// then delivered out of order (TestGRPCPushAPI, 3,000 pushes to a room
// over one stream). A queue per node, not per room, so that a node that
// does not answer holds up its own deliveries, not the others'.
type roomQueues struct {
	size int
	// timeout bounds one call: half of job.timeout, so that a push that
	// waits for the call before it (at most that long) and then rides
	// the next still ends within its attempt's job.timeout.
	timeout time.Duration
	call    func(ctx context.Context, addr string, req *pb.BroadcastRoomReq) error

	// base ends at close: the calls in flight end with it, and close
	// waits for the queues' goroutines (running).
	base    context.Context
	stop    context.CancelFunc
	running sync.WaitGroup

	mu     sync.Mutex
	queues map[roomNode]*roomQueue
	closed bool
}

type roomNode struct{ room, node string }

type roomQueue struct {
	addr    string
	pending []*roomItem
}

type roomItem struct {
	proto *pb.Proto
	done  chan error
	// gone: its caller stopped waiting (its attempt ended); it is not
	// sent, so a retry does not queue behind its own earlier copy.
	gone atomic.Bool
}

// maxQueued bounds what waits for one room on one node: a node that does
// not answer takes a call's timeout per batch, and what came meanwhile
// would otherwise pile up and all go when it is back. Past it a push
// fails at once for that node, and is retried.
const maxQueued = 4096

// errQueueFull is a push refused because its node's queue for the room
// holds maxQueued.
var errQueueFull = errors.New("room queue to this node full: the node is not keeping up")

// errQueuesClosed is a push sent after job's stage closed.
var errQueuesClosed = errors.New("job stage closed")

// position is the item's place in its room's stream: its epoch and
// position (none without history).
func (it *roomItem) position() (string, uint64) {
	if len(it.proto.Positions) == 0 {
		return "", 0
	}
	return it.proto.Positions[0].Epoch, it.proto.Positions[0].Pos
}

// inPositionOrder sorts a queue's items by their position in the room's
// stream (epochs in the order they first appear, items without one where
// they came): a bundle's pushes reach the queue in whatever order their
// goroutines run, and one that came late would otherwise wait behind
// those after it while the node holds them for it.
func inPositionOrder(items []*roomItem) {
	rank := map[string]int{}
	for _, it := range items {
		if e, _ := it.position(); e != "" {
			if _, ok := rank[e]; !ok {
				rank[e] = len(rank)
			}
		}
	}
	if len(rank) == 0 {
		return
	}
	slices.SortStableFunc(items, func(a, b *roomItem) int {
		ea, pa := a.position()
		eb, pb := b.position()
		if ea == "" || eb == "" {
			return 0
		}
		if c := rank[ea] - rank[eb]; c != 0 {
			return c
		}
		return cmp.Compare(pa, pb)
	})
}

func newRoomQueues(size int, jobTimeout time.Duration, call func(context.Context, string, *pb.BroadcastRoomReq) error) *roomQueues {
	base, stop := context.WithCancel(context.Background())
	return &roomQueues{size: max(size, 1), timeout: jobTimeout / 2, call: call, base: base, stop: stop, queues: map[roomNode]*roomQueue{}}
}

// close ends the calls in flight, fails what waits and what comes after,
// and returns once no queue's goroutine runs.
func (r *roomQueues) close() {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	r.stop()
	r.running.Wait()
}

// sendAll queues ps (in order) for room on each of nodes and waits until
// each node took each or failed, or ctx ends. oks[i] are the nodes that
// took ps[i]: a node's queue may send them in more than one call, and
// one call may fail where another did not.
func (r *roomQueues) sendAll(ctx context.Context, room string, nodes map[string]string, ps []*pb.Proto) (oks [][]string, err error) {
	return r.start(room, nodes, ps)(ctx)
}

// start queues ps as sendAll does and returns at once; the wait it
// returns waits for the outcome, as sendAll would have.
func (r *roomQueues) start(room string, nodes map[string]string, ps []*pb.Proto) (wait func(ctx context.Context) (oks [][]string, err error)) {
	ids := slices.Sorted(maps.Keys(nodes))
	items := make([][]*roomItem, len(ids))
	for i, id := range ids {
		items[i] = make([]*roomItem, len(ps))
		for j, p := range ps {
			items[i][j] = &roomItem{proto: p, done: make(chan error, 1)}
		}
		key := roomNode{room, id}
		r.mu.Lock()
		if r.closed {
			r.mu.Unlock()
			for _, it := range items[i] {
				it.done <- errQueuesClosed
			}
			continue
		}
		q := r.queues[key]
		start := q == nil
		if start {
			q = &roomQueue{}
			r.queues[key] = q
			r.running.Add(1)
		}
		// The node's address as the caller knows it now: a node that
		// restarted elsewhere under its id is called there from the next
		// batch on.
		q.addr = nodes[id]
		for _, it := range items[i] {
			if len(q.pending) >= maxQueued {
				it.done <- errQueueFull
			} else {
				q.pending = append(q.pending, it)
			}
		}
		r.mu.Unlock()
		if start {
			go r.run(key, q)
		}
	}
	return func(ctx context.Context) (oks [][]string, err error) { return r.wait(ctx, ids, items, len(ps)) }
}

// wait collects the outcome of items (per node in ids, per proto of n).
func (r *roomQueues) wait(ctx context.Context, ids []string, items [][]*roomItem, n int) (oks [][]string, err error) {
	oks = make([][]string, n)
	var errs []error
	ended := false
	for i, node := range items {
		var nodeErr error
		for j, it := range node {
			var e error
			if !ended {
				select {
				case e = <-it.done:
				case <-ctx.Done():
					ended = true
				}
			}
			if ended {
				// The attempt ended: take what is already known (a node
				// that took it is recorded, so a retry skips it) and
				// drop the rest from their queues.
				select {
				case e = <-it.done:
				default:
					it.gone.Store(true)
					e = ctx.Err()
				}
			}
			if e != nil {
				if nodeErr == nil {
					nodeErr = fmt.Errorf("cloud %s: %w", ids[i], e)
				}
				continue
			}
			oks[j] = append(oks[j], ids[i])
		}
		if nodeErr != nil {
			errs = append(errs, nodeErr)
		}
	}
	return oks, errors.Join(errs...)
}

// run sends a queue's items, batch after batch, until none is left; the
// queue is then forgotten (under the lock, so nothing is added to it
// after).
func (r *roomQueues) run(key roomNode, q *roomQueue) {
	defer r.running.Done()
	for {
		r.mu.Lock()
		q.pending = slices.DeleteFunc(q.pending, func(it *roomItem) bool { return it.gone.Load() })
		if r.closed {
			for _, it := range q.pending {
				it.done <- errQueuesClosed
			}
			q.pending = nil
		}
		if len(q.pending) == 0 {
			delete(r.queues, key)
			r.mu.Unlock()
			return
		}
		inPositionOrder(q.pending)
		n := min(len(q.pending), r.size)
		batch := q.pending[:n:n]
		q.pending = q.pending[n:]
		addr := q.addr
		r.mu.Unlock()

		req := &pb.BroadcastRoomReq{RoomId: key.room}
		if len(batch) == 1 {
			req.Proto = batch[0].proto
		} else {
			req.Batch = make([]*pb.Proto, len(batch))
			for i, it := range batch {
				req.Batch[i] = it.proto
			}
		}
		ctx, cancel := context.WithTimeout(r.base, r.timeout)
		err := r.call(ctx, addr, req)
		cancel()
		for _, it := range batch {
			it.done <- err
		}
	}
}
