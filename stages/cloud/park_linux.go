package cloud

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// parker holds idle connections without a goroutine each: an idle
// client's reader registers the socket with an epoll set and ends, and a
// new reader starts when the client sends something (or the connection is
// closed, or its heartbeat deadline passes). A goroutine blocked in a
// read costs a 4 KB stack (8 KB after a heartbeat's call into logic), the
// largest part of an idle connection.
//
// Go's own poller keeps the socket registered too; this is a second,
// one-shot registration whose only job is to say "readable". Entries are
// keyed by a per-connection id, never the descriptor, so an event for a
// connection that is gone, whose descriptor was reused, finds nothing.
type parker struct {
	epfd, wakefd int

	ctl     sync.RWMutex      // read-held while registering; close takes it
	mu      sync.Mutex        // guards what follows
	parked  map[uint64]func() // id → its resume
	running bool
	closed  bool
	done    chan struct{}
}

// wakeID is the epoll key of the eventfd that stops the loop.
const wakeID = 0

func newParker() (*parker, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("create epoll set: %w", err)
	}
	wakefd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		_ = unix.Close(epfd)
		return nil, fmt.Errorf("create eventfd: %w", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wakefd, &ev); err != nil {
		_ = unix.Close(epfd)
		_ = unix.Close(wakefd)
		return nil, fmt.Errorf("watch eventfd: %w", err)
	}
	return &parker{epfd: epfd, wakefd: wakefd, parked: map[uint64]func(){}, done: make(chan struct{})}, nil
}

// park registers conn's socket under id so that resume runs, on a new
// goroutine, once the socket is readable or wake(id) is called. first says
// the socket was never registered.
//
// park reports whether the connection was handed off. true: resume now
// belongs to the parker, or already to a waker that took it, and the
// caller's goroutine must end without reading again. false: the socket
// could not be registered and resume will never run; the caller keeps the
// connection and reads as usual.
//
// resume is published before the socket is registered, so that an event
// arriving as soon as it is registered finds it. A close (replacement,
// slow consumer, another node's close, drain) in between wakes the
// connection: the waker takes resume and starts a second reader, and the
// registration then fails on the closed socket. Taking resume back decides
// who owns the connection: whoever takes it, never both.
func (p *parker) park(conn syscall.Conn, id uint64, first bool, resume func()) bool {
	raw, err := conn.SyscallConn()
	if err != nil {
		return false
	}
	// Held until the registration is done, so that close cannot release
	// the epoll set (whose descriptor may be reused) under it.
	p.ctl.RLock()
	defer p.ctl.RUnlock()
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return false
	}
	if !p.running {
		p.running = true
		go p.loop()
	}
	p.parked[id] = resume
	p.mu.Unlock()
	op := unix.EPOLL_CTL_MOD
	if first {
		op = unix.EPOLL_CTL_ADD
	}
	// The kernel hands the event's 64 bits of data back as given; x/sys
	// names them Fd and Pad.
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT, Fd: int32(uint32(id)), Pad: int32(uint32(id >> 32))}
	var cerr error
	// Control holds the descriptor open: it cannot be closed and reused
	// while it is being registered.
	err = raw.Control(func(fd uintptr) {
		cerr = unix.EpollCtl(p.epfd, op, int(fd), &ev)
		// first is a hint: a socket handed off before its first
		// registration was made may be registered or not.
		switch {
		case errors.Is(cerr, unix.ENOENT) && op == unix.EPOLL_CTL_MOD:
			cerr = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, int(fd), &ev)
		case errors.Is(cerr, unix.EEXIST) && op == unix.EPOLL_CTL_ADD:
			cerr = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_MOD, int(fd), &ev)
		}
	})
	if err != nil || cerr != nil {
		// Not registered. If a waker took resume meanwhile, it runs the
		// connection now and this caller must stop.
		return p.take(id) == nil
	}
	return true
}

// wake runs id's resume now, if it is parked.
func (p *parker) wake(id uint64) {
	if resume := p.take(id); resume != nil {
		go resume()
	}
}

// take removes id's resume and returns it; nil when it is not parked. The
// one caller that gets it owns the connection.
func (p *parker) take(id uint64) func() {
	p.mu.Lock()
	defer p.mu.Unlock()
	resume := p.parked[id]
	delete(p.parked, id)
	return resume
}

func (p *parker) loop() {
	defer close(p.done)
	events := make([]unix.EpollEvent, 128)
	for {
		n, err := unix.EpollWait(p.epfd, events, -1)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return
		}
		for i := range events[:n] {
			id := uint64(uint32(events[i].Fd)) | uint64(uint32(events[i].Pad))<<32
			if id == wakeID {
				return
			}
			p.wake(id)
		}
	}
}

// close stops the loop and releases the epoll set. Whatever is still
// parked is resumed (a drain that timed out leaves sessions behind): those
// readers then read without parking, since park refuses once closed.
func (p *parker) close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	running := p.running
	resumes := make([]func(), 0, len(p.parked))
	for id, resume := range p.parked {
		resumes = append(resumes, resume)
		delete(p.parked, id)
	}
	p.mu.Unlock()
	for _, resume := range resumes {
		go resume()
	}
	if running {
		var one [8]byte
		binary.NativeEndian.PutUint64(one[:], 1)
		_, _ = unix.Write(p.wakefd, one[:])
		<-p.done
	}
	// No registration is in progress once ctl is held, and none starts:
	// closed is set.
	p.ctl.Lock()
	defer p.ctl.Unlock()
	_ = unix.Close(p.epfd)
	_ = unix.Close(p.wakefd)
}

// count is how many connections are parked.
func (p *parker) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.parked)
}
