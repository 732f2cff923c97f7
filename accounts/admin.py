from django.contrib import admin

from .models import Address


@admin.register(Address)
class AddressAdmin(admin.ModelAdmin):
    list_display = ("id", "owner", "name", "city", "country", "created_at")
    search_fields = ("owner__username", "owner__email", "name", "city")
    raw_id_fields = ("owner",)
