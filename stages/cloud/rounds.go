package cloud

import "sync"

// roomRounds groups the room pushes that arrive while the same room's
// previous fan-out is still running into one round, delivered as one
// batch: each member is then queued to once per round, not once per
// message, and its writer sends the round in one frame.
//
// It is group commit, applied to fan-out: no push waits for a timer. A
// push to an idle room goes out at once; under load, rounds grow with the
// backlog, which is what keeps a node that falls behind catching up
// instead of paying per message for queueing and goroutine starts. A
// room's rounds run one after another, so its messages keep their order.
type roomRounds struct {
	mu    sync.Mutex
	rooms map[string]*roomState
}

// roomState is a room with a fan-out running.
type roomState struct {
	next *round // gathering while the current round runs; nil if none
}

// round is one fan-out's packets. The push that opened it leads: it waits
// for the room's current round, delivers this one and hands the room on.
type round struct {
	items []outItem
	start chan struct{} // closed when the round may run
	done  chan struct{} // closed when it has run
	n     int           // members that got any of its packets
}

func newRoomRounds() *roomRounds { return &roomRounds{rooms: map[string]*roomState{}} }

// send delivers items to room through deliver, alone if the room is idle,
// else in the next round, and returns the number of members the round
// reached. It returns once its items are queued to every member.
func (g *roomRounds) send(room string, items []outItem, deliver func([]outItem) int) int {
	g.mu.Lock()
	st := g.rooms[room]
	if st == nil {
		g.rooms[room] = &roomState{}
		g.mu.Unlock()
		n := deliver(items)
		g.handOn(room)
		return n
	}
	r := st.next
	lead := r == nil
	if lead {
		r = &round{start: make(chan struct{}), done: make(chan struct{})}
		st.next = r
	}
	r.items = append(r.items, items...)
	g.mu.Unlock()
	if !lead {
		<-r.done
		return r.n
	}
	<-r.start // once started, the round takes no more items
	r.n = deliver(r.items)
	close(r.done)
	g.handOn(room)
	return r.n
}

// handOn starts the room's gathered round, or marks the room idle.
func (g *roomRounds) handOn(room string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	st := g.rooms[room]
	if st.next == nil {
		delete(g.rooms, room)
		return
	}
	close(st.next.start)
	st.next = nil
}

// join adds items to room's fan-out as send does, but returns at once: the
// returned run delivers (or waits for the round that does) and returns
// what send would. Items joined one after another are delivered in that
// order, so a caller that joins under its own lock orders its deliveries
// by that lock without holding it through the fan-out. run must be
// called, or the room's later rounds never start.
func (g *roomRounds) join(room string, items []outItem, deliver func([]outItem) int) (run func() int) {
	g.mu.Lock()
	st := g.rooms[room]
	if st == nil {
		g.rooms[room] = &roomState{}
		g.mu.Unlock()
		return func() int {
			n := deliver(items)
			g.handOn(room)
			return n
		}
	}
	r := st.next
	lead := r == nil
	if lead {
		r = &round{start: make(chan struct{}), done: make(chan struct{})}
		st.next = r
	}
	r.items = append(r.items, items...)
	g.mu.Unlock()
	if !lead {
		return func() int {
			<-r.done
			return r.n
		}
	}
	return func() int {
		<-r.start
		r.n = deliver(r.items)
		close(r.done)
		g.handOn(room)
		return r.n
	}
}
