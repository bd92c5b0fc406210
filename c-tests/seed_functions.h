/* The 28 functions of the seed header, as an X-macro, so tests can take every address. */
#define SEED_FUNCTIONS(X) \
    X(postcopy_ram_supported_by_host) X(postcopy_ram_incoming_setup) \
    X(postcopy_ram_incoming_init) X(postcopy_ram_incoming_cleanup) \
    X(postcopy_ram_prepare_discard) X(postcopy_discard_send_init) \
    X(postcopy_discard_send_range) X(postcopy_discard_send_finish) \
    X(postcopy_place_page) X(postcopy_place_page_zero) X(postcopy_state_get) \
    X(postcopy_state_set) X(postcopy_fault_thread_notify) \
    X(postcopy_infrastructure_init) X(postcopy_add_notifier) \
    X(postcopy_remove_notifier) X(postcopy_notify) X(postcopy_thread_create) \
    X(postcopy_register_shared_ufd) X(postcopy_unregister_shared_ufd) \
    X(postcopy_notify_shared_wake) X(postcopy_wake_shared) \
    X(postcopy_request_shared_page) X(postcopy_preempt_new_channel) \
    X(postcopy_preempt_setup) X(postcopy_preempt_establish_channel) \
    X(postcopy_is_paused) X(mark_postcopy_blocktime_begin)
